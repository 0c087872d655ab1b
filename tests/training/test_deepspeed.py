"""DeepSpeed ZeRO-1/2 on 2 processes reproduces the single-process run (no process group, no DeepSpeed), and a
NaN loss on one rank skips the step on both without disturbing the engine.

Run as a script under torchrun, this file is the NaN run's worker (see nan_worker)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import dump_run
from launch.env import ProcessEnv, free_port
from megatron_hope.config import load
from megatron_hope.model.lm import HopeLM
from megatron_hope.parallel import deepspeed_engine
from megatron_hope.training.deepspeed_trainer import DeepSpeedTrainer
from megatron_hope.training.metrics import RunLogger
from megatron_hope.training.optimizer import build_optimizer
from megatron_hope.training.schedule import lr_lambda
from train_helpers import REPO, NaNLoss, run_in_process, run_torchrun, tiny_run_config

STEPS = 10
# Measured over these 10 steps (dp 2 vs 1 process, all three cases): losses differ by <= 1.6e-7 relative, grad
# norms by <= 2.3e-7 (order of the gradient average, of the partitioned norm, and micro-batch shapes). Failures
# this catches: DeepSpeed without clipping moves the loss by 5.9e-5 relative (params by 1e-3); a missing
# 1/accumulation scale doubles the grad norm.
RTOL = 1e-5
# Measured max |parameter difference| after 10 steps: 1.2e-7 with micro 2, 7.4e-7 with micro 1 x accumulation 2
# (the forward then sums in another order; AdamW normalises the resulting gradient noise). Peak lr is 1e-3.
PARAM_ATOL = 2e-6


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One process, no process group: global batch 4 = micro 2 x accumulation 2."""
    root = tmp_path_factory.mktemp("deepspeed")
    config = tiny_run_config(root / "tiny.toml", data, root / "runs")
    argv = ["--config", str(config), f"--train.train_steps={STEPS}", "--train.eval_batches=0"]
    return argv, run_in_process(argv + ["--train.run_name=ref"], root / "ref.pt")


@pytest.mark.parametrize("stage, micro_batch", [(1, 2), (2, 2), (2, 1)],
                         ids=["zero1-accum1", "zero2-accum1", "zero2-accum2"])
def test_zero_on_two_processes_matches_one_process(reference, tmp_path, stage, micro_batch):
    """dp 2 x micro 2 x accumulation 1, or dp 2 x micro 1 x accumulation 2 (DeepSpeed accumulating), sees the
    same 4 sequences per step as 1 process x micro 2 x accumulation 2."""
    argv, ref = reference
    got = run_torchrun(argv + [f"--train.run_name=zero{stage}-mb{micro_batch}", "--parallel.dp_engine=deepspeed",
                               f"--parallel.zero_stage={stage}", f"--train.micro_batch_size={micro_batch}"],
                       tmp_path / "ds.pt")
    assert_matches(ref, got)


def assert_matches(ref: dict, got: dict) -> None:
    assert [s["skipped"] for s in got["steps"]] == [s["skipped"] for s in ref["steps"]] == [False] * STEPS
    for key in ("loss", "grad_norm", "lr"):
        torch.testing.assert_close(torch.tensor([s[key] for s in got["steps"]], dtype=torch.float64),
                                   torch.tensor([s[key] for s in ref["steps"]], dtype=torch.float64),
                                   rtol=RTOL, atol=0, msg=lambda m: f"per-step {key}: {m}")
    assert got["params"].keys() == ref["params"].keys()
    for name, value in ref["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=PARAM_ATOL,
                                   msg=lambda m: f"{name}: {m}")


def test_deepspeed_launcher_runs_the_engine_on_two_local_processes(reference, tmp_path):
    """`deepspeed --num_gpus 2` (its launcher sets RANK/WORLD_SIZE/LOCAL_RANK and passes --local_rank): the
    environment is detected as the deepspeed launcher's and the run matches the single-process one."""
    argv, ref = reference
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    launcher = Path(sys.executable).with_name("deepspeed")  # this venv's, activated or not
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), dump_run.__file__, *argv,
           "--train.run_name=ds-launcher", "--parallel.dp_engine=deepspeed", "--out", str(tmp_path / "ds.pt")]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got = torch.load(tmp_path / "ds.pt")
    assert "2 process(es) (deepspeed launch)" in (Path(got["run_dir"]) / "train.log").read_text()
    assert_matches(ref, got)


def test_nan_loss_on_one_rank_skips_the_step_on_both(tmp_path):
    """ZeRO-2, micro 1 x accumulation 2: rank 1's first micro-batch of step 2 has a NaN loss but a finite
    gradient, which DeepSpeed's own norm check would let through. Both ranks skip step 2 with the parameters
    unchanged, and step 3 equals step 2 of a run that never saw step 2's data: no gradient, optimizer state or
    accumulation-counter change survives the skip."""
    got = run_torchrun([], tmp_path / "nan.pt", script=__file__)
    nan, ref = got["nan"], got["ref"]
    assert got["skipped_per_rank"] == [[False, True, False]] * 2
    assert math.isnan(nan["steps"][1][0])
    for name, value in nan["params"][0].items():
        assert torch.equal(nan["params"][1][name], value), name
    assert nan["steps"][2] == ref["steps"][1]
    for name, value in ref["params"][-1].items():
        assert torch.equal(nan["params"][-1][name], value), name


def nan_worker(out: str) -> None:
    """Two runs on this torchrun's 2 ranks: "nan" trains on 3 steps' data with a NaN on rank 1 in step 2, "ref"
    on the same data without step 2. Saves each step's (loss, norm, skipped) and the parameters after each."""
    cfg = load(str(REPO / "configs" / "hope_tiny.toml"), [
        "--train.micro_batch_size=1", "--train.global_batch_size=4", "--train.seq_len=32", "--train.eval_batches=0",
        "--optim.warmup_steps=0", "--parallel.dp_engine=deepspeed", "--parallel.zero_stage=2"])
    device, env = torch.device("cpu"), ProcessEnv.from_environ()
    rank = env.rank
    deepspeed_engine.init_distributed(rank, env.world_size, device)
    g = torch.Generator().manual_seed(rank)
    data = [[{"tokens": torch.randint(0, cfg.model.vocab_size, (1, 33), generator=g),
              "doc_start": torch.zeros(1, 32, dtype=torch.bool)} for _ in range(2)] for _ in range(3)]
    results = {}
    for name, nan_calls, steps in (("nan", {2} if rank == 1 else set(), data), ("ref", set(), [data[0], data[2]])):
        torch.manual_seed(0)
        model = NaNLoss(HopeLM(cfg.model), nan_calls, keep_gradient=True)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.train.train_steps))
        engine = deepspeed_engine.initialize(model, optimizer, cfg, device)
        trainer = DeepSpeedTrainer(engine, optimizer, scheduler, cfg, device,
                                   RunLogger(None, cfg.train.train_steps, False), 1.0, None)
        results[name] = {"steps": [], "params": []}
        for micro_batches in steps:
            results[name]["steps"].append(trainer.step(micro_batches))
            results[name]["params"].append(deepspeed_engine.full_fp32_state_dict(engine))
    skipped = [None] * env.world_size
    dist.all_gather_object(skipped, [s[2] for s in results["nan"]["steps"]])
    if rank == 0:
        torch.save({**results, "skipped_per_rank": skipped}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    nan_worker(sys.argv[sys.argv.index("--out") + 1])
