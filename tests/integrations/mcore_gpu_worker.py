"""torchrun worker of test_megatron_core.py's GPU tests (1 process, NCCL): the plug-in under megatron-core's own
GPU machinery against the native HopeLM from the same weights.

GPU weight init with the real RNG tracker, DDP + DistributedOptimizer, the no-pipelining schedule (3 Adam steps),
full activation recompute (HOPE), dist_checkpointing save + load, bf16 through Float16Module. Writes JSON to
argv[1]: per case native / megatron losses, ckpt_identical, loss_bf16 / loss_fp32.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.module import Float16Module

from megatron_hope.config import load
from megatron_hope.integrations.megatron_core import (HopeTransformerConfig, build_gpt_model,
                                                      get_forward_backward_func, to_megatron)
from megatron_hope.model.lm import HopeLM

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
CASES = {"hope": ("hope", {}), "titans": ("titans", {}), "transformerpp": ("transformerpp", {}),
         "hope_recompute": ("hope", RECOMPUTE)}
STEPS, BATCH, SEQ, LR = 3, 2, 32, 1e-3


def forward_step(data_iterator, model):
    tokens = next(data_iterator)
    out = model(tokens[:, :-1], None, None, labels=tokens[:, 1:])

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"loss": loss.detach()}

    return out, loss_func


def megatron_training(config: HopeTransformerConfig, gpt, data: list[torch.Tensor]) -> list[float]:
    """Megatron-core's DDP, distributed Adam (no weight decay, no clipping) and schedule."""
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=True,
                                                                        grad_reduce_in_fp32=True), gpt)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, clip_grad=0.0,
                                                 params_dtype=torch.float32, use_distributed_optimizer=True), [ddp])
    config.finalize_model_grads_func = finalize_model_grads
    schedule = get_forward_backward_func()
    losses = []
    for tokens in data:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        out = schedule(forward_step_func=forward_step, data_iterator=iter([tokens]), model=[ddp],
                       num_microbatches=1, seq_length=SEQ, micro_batch_size=BATCH, forward_only=False)
        opt.step()
        losses.append(out[0]["loss"].item())
    return losses


def run_case(preset: str, extra: dict) -> dict:
    cfg = load(str(CONFIGS / f"{preset}_tiny.toml")).model
    torch.manual_seed(0)
    native = HopeLM(cfg)
    weights = to_megatron(native.state_dict(), cfg, 1)[0]
    native.cuda()
    config = HopeTransformerConfig(hope=cfg, use_cpu_initialization=False, params_dtype=torch.float32, **extra)
    gpt = build_gpt_model(config).cuda()
    gpt.load_state_dict(weights)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=g).cuda() for _ in range(STEPS)]
    opt = torch.optim.AdamW(native.parameters(), lr=LR, weight_decay=0.0)
    native_losses = []
    for tokens in data:
        opt.zero_grad()
        loss = native(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        opt.step()
        native_losses.append(loss.item())
    result = dict(native=native_losses, megatron=megatron_training(config, gpt, data))
    if extra:
        return result
    with tempfile.TemporaryDirectory() as d:
        dist_checkpointing.save(gpt.sharded_state_dict(), d)
        torch.manual_seed(5)
        fresh = build_gpt_model(config).cuda()
        fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), d))
    saved, loaded = gpt.state_dict(), fresh.state_dict()
    result["ckpt_identical"] = all(torch.equal(saved[k], loaded[k]) for k in saved if not k.endswith("_extra_state"))
    half_config = HopeTransformerConfig(hope=cfg, use_cpu_initialization=False, params_dtype=torch.bfloat16, bf16=True)
    half = Float16Module(half_config, build_gpt_model(half_config).cuda())
    half.module.load_state_dict({k: v.to(torch.bfloat16) for k, v in saved.items() if not k.endswith("_extra_state")})
    tokens = data[0]
    with torch.no_grad():
        result["loss_bf16"] = half(tokens[:, :-1], None, None, labels=tokens[:, 1:]).float().mean().item()
        result["loss_fp32"] = gpt(tokens[:, :-1], None, None, labels=tokens[:, 1:]).float().mean().item()
    return result


def main(out: str) -> None:
    dist.init_process_group("nccl")
    torch.cuda.set_device(0)
    ps.initialize_model_parallel(1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    results = {name: run_case(*case) for name, case in CASES.items()}
    Path(out).write_text(json.dumps(results, indent=1))
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":  # dist_checkpointing's writer starts spawned processes that re-import this file
    main(sys.argv[1])
