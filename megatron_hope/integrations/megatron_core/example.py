"""Example: megatron-core's GPTModel with HOPE layers (or a baseline's), a few AdamW steps on one random batch.

    python -m megatron_hope.integrations.megatron_core.example --config configs/hope_tiny.toml --model.n_layers=4
    torchrun --nproc_per_node=2 -m megatron_hope.integrations.megatron_core.example --tp 2

Runs on GPUs (NCCL) and on CPU (gloo, with the settings megatron-core needs there: CPU weight initialisation,
the no-op RNG tracker, no sequence parallelism, no pipeline schedules). Every rank trains on the same batch,
so data-parallel ranks stay identical without a gradient all-reduce; a real run wraps the model in
megatron-core's DistributedDataParallel and uses its schedules (GPU only).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_hope.config import load
from megatron_hope.integrations.megatron_core import HopeTransformerConfig, build_gpt_model


def init_distributed(tp: int, seed: int) -> torch.device:
    """Process group (a single process without torchrun), megatron-core's parallel state and RNG."""
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group(backend)
    else:  # one process: an in-memory store, no port
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    torch.manual_seed(seed)  # the same on every TP rank: megatron-core's CPU init slices whole weights
    # on CPU the tracker must not touch CUDA RNG states: the inference tracker's fork() is a no-op
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not cuda)
    return device


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/hope_tiny.toml", help="a megatron-hope TOML preset")
    p.add_argument("--tp", type=int, default=1, help="tensor_model_parallel_size")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args, overrides = p.parse_known_args(argv)  # the rest: config overrides such as --model.n_layers=4

    device = init_distributed(args.tp, args.seed)
    hope = load(args.config, overrides).model
    config = HopeTransformerConfig(hope=hope, tensor_model_parallel_size=args.tp,
                                   use_cpu_initialization=device.type == "cpu", params_dtype=torch.float32)
    model = build_gpt_model(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    tokens = torch.randint(0, hope.vocab_size, (args.batch, args.seq + 1),
                           generator=torch.Generator().manual_seed(args.seed)).to(device)
    for step in range(args.steps):
        optimizer.zero_grad()
        loss = model(tokens[:, :-1], None, None, labels=tokens[:, 1:]).mean()  # GPTModel returns per-token loss
        loss.backward()
        optimizer.step()
        if dist.get_rank() == 0:
            print(f"step {step} loss {loss.item():.6f}", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
