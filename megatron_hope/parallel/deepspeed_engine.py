"""Data parallelism with DeepSpeed ZeRO stage 1 or 2 (parallel.dp_engine = "deepspeed"): the engine over a model,
and the engine-neutral checkpoint tensors (checkpoints/state.py). The training step that drives the engine is
training/deepspeed_trainer.py.

DeepSpeed wraps the model and our AdamW (client optimizer, with its no-decay groups); it scales each micro-batch
by 1/gradient_accumulation_steps, averages gradients over ranks, clips to optim.grad_clip and steps the optimizer
at the last micro-batch of a step, so a step means what it means with FSDP2. The LR schedule stays the trainer's
LambdaLR on the client optimizer (DeepSpeed is given none): DeepSpeed would not advance it on a skipped step.
fp32 on CPU (gloo), bf16 on CUDA (nccl).

deepspeed is imported inside the functions: DS_ACCELERATOR must be set before its import, and FSDP2 runs do
not need it. On CPU its first process group JIT-builds the shm-comm op (~45 s), cached in TORCH_EXTENSIONS_DIR,
which defaults here to the checkout's ignored .cache/torch_extensions.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from megatron_hope.config import Config

EXTENSIONS_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions"


def init_distributed(rank: int, world_size: int, device: torch.device, timeout_s: float = 600) -> None:
    """Start the default process group (gloo on CPU, nccl on CUDA) and hand it to DeepSpeed; a lone process
    without torchrun gets an in-memory store."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_CACHE))
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    import deepspeed

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = None
    if world_size == 1 and not dist.is_torchelastic_launched():
        store = dist.HashStore()
        os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed.initialize asserts that a launcher set it
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))  # adopts the group


def deepspeed_config(cfg: Config, dp_size: int, device: torch.device) -> dict:
    t = cfg.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(dp_size),
        "gradient_clipping": cfg.optim.grad_clip,  # 0 = off, as in our config
        "zero_optimization": {"stage": cfg.parallel.zero_stage, "elastic_checkpoint": False},
        "bf16": {"enabled": device.type == "cuda", "check_grad_overflow": True},
        "steps_per_print": 2**31 - 1,  # progress goes through our RunLogger
        "wall_clock_breakdown": False,
    }


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, device: torch.device) -> nn.Module:
    """The DeepSpeed engine over `model` (on `device`) and the client `optimizer`; needs init_distributed."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(cfg, dist.get_world_size(), device))
    return engine


def full_fp32_state_dict(engine: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded fp32 master parameters by state-dict name, on CPU; a collective: call it on every rank."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(engine.module.named_parameters(remove_duplicate=False))
    return {name: safe_get_full_fp32_param(params[name]).detach().cpu().clone()
            for name in engine.module.state_dict()}


def _group_steps(engine: nn.Module) -> dict[int, torch.Tensor]:
    """AdamW's step count of each parameter (by id): the count of its ZeRO group's flat fp32 partition."""
    zero = engine.optimizer
    return {id(p): zero.optimizer.state[zero.single_partition_of_fp32_groups[i]]["step"]
            for i, group in enumerate(zero.bit16_groups) for p in group}


def checkpoint_tensors(engine: nn.Module) -> dict:
    """The engine-neutral checkpoint tensors (checkpoints/state.py), full and unsharded: {"model": fp32 master
    parameters by state-dict name, "optim": {"state": {name: {"step", "exp_avg", "exp_avg_sq"}}}}, the optimizer
    state under each parameter's first name, as torch.distributed.checkpoint.state_dict names it for FSDP2. A
    collective (every rank gathers the full tensors; the checkpoint writer keeps one copy)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    steps = _group_steps(engine)
    state = {name: {"step": steps[id(p)].clone(),
                    "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").detach().cpu(),
                    "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").detach().cpu()}
             for name, p in engine.module.named_parameters()}
    return {"model": full_fp32_state_dict(engine), "optim": {"state": state}}


def load_checkpoint_tensors(engine: nn.Module, read: Callable[[dict], None]) -> None:
    """Fill checkpoint_tensors()'s layout from a checkpoint (`read` loads it in place) and set the engine's
    master parameters, module parameters, moments and step counts from it."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    target = checkpoint_tensors(engine)
    read(target)
    steps = _group_steps(engine)
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            full, saved = target["model"][name], target["optim"]["state"][name]
            safe_set_full_fp32_param(p, full)
            p.copy_(full)  # ZeRO-1/2 keep the whole module on every rank
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, saved[key], key)
            steps[id(p)].copy_(saved["step"])  # one count per ZeRO group: all its parameters stepped together
