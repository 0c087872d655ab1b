"""Run launch.train's training in this process (one rank of a torchrun job, or alone) and save, from rank 0,
each step's results, the final validation loss and the full (unsharded) final parameters of all stages to --out."""
from __future__ import annotations

import sys
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from launch.env import ProcessEnv
from launch.train import prepare, start_process_group, train
from megatron_hope.parallel.deepspeed_engine import full_fp32_state_dict


def main(argv: list[str]) -> None:
    out = argv[argv.index("--out") + 1]
    argv = argv[:argv.index("--out")] + argv[argv.index("--out") + 2:]
    run = prepare(argv, ProcessEnv.from_environ())
    mesh = start_process_group(run)
    try:
        model, result = train(run, mesh)
        if run.cfg.parallel.dp_engine == "deepspeed":
            params = full_fp32_state_dict(model)
        elif mesh is None:
            params = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:  # every rank's full parameters: pipeline stages hold different ones
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, {k: v.detach().cpu() for k, v in full.items()})
            params = {k: v for part in parts for k, v in part.items()}
        if run.is_main:
            torch.save({"steps": [asdict(s) for s in result.steps], "val_loss": result.val_loss,
                        "params": params, "run_dir": str(run.run_dir)}, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
