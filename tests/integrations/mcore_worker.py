"""torchrun worker of test_megatron_core.py (2 processes, gloo): the native HopeLM against megatron-core's
GPTModel built with the plug-in's layer specs, from the same weights, at TP=2 and then TP=1.

For each case (model variant) and TP size it records, into the JSON file named by argv[1] (written by rank 0):
  native / megatron: the losses of 3 AdamW steps on the same batches (megatron: one list per rank);
  grad_rel: max over parameters of max|megatron first-step gradient mapped back - native| / max|native|;
  weight_rel: max over parameters of |megatron trained weights mapped back - native| / |native update|;
  reshard_max_diff (TP=1 entries): max |TP=2 sharded_state_dict reassembled - TP=1 one|, -1 if the keys
  or shapes differ.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from megatron_hope.config import load
from megatron_hope.integrations.megatron_core import HopeTransformerConfig, build_gpt_model, from_megatron, to_megatron
from megatron_hope.model.lm import HopeLM

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# name -> (preset, overrides): the three tiny presets, and HOPE with linear memories and an adaptive q
CASES = {"hope": ("hope", []), "titans": ("titans", []), "transformerpp": ("transformerpp", []),
         "hope_linear": ("hope", ["--model.memory.kind=linear", "--model.memory.adaptive_q=true"])}
STEPS, BATCH, SEQ, LR = 3, 2, 32, 1e-3


def batches(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def train(model: torch.nn.Module, loss_fn, data: list[torch.Tensor]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """AdamW steps, one per batch -> (losses, the first step's gradients by parameter name)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, first_grads = [], {}
    for tokens in data:
        opt.zero_grad()
        loss = loss_fn(model, tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        first_grads = first_grads or {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return losses, first_grads


def gather_tp(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """This TP group's dicts, in TP rank order."""
    out = [None] * ps.get_tensor_model_parallel_world_size()
    dist.all_gather_object(out, tensors, group=ps.get_tensor_model_parallel_group())
    return out


def full_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor reassembled whole from the TP ranks' sharded_state_dict pieces."""
    pieces = []
    for item in model.sharded_state_dict().values():
        built = item.build() if isinstance(item, ShardedTensorFactory) else [item]
        pieces += [(t.key, t.global_shape, t.global_offset, t.local_shape, t.data.detach().clone())
                   for t in built if isinstance(t, ShardedTensor)]
    gathered = [None] * ps.get_tensor_model_parallel_world_size()
    dist.all_gather_object(gathered, pieces, group=ps.get_tensor_model_parallel_group())
    full: dict[str, torch.Tensor] = {}
    for key, shape, offset, local_shape, data in (p for rank in gathered for p in rank):
        whole = full.setdefault(key, torch.full(shape, float("nan")))
        lead = len(shape) - len(local_shape)  # axes megatron-core prepends (the layer index)
        index = tuple(slice(o, o + 1) for o in offset[:lead]) + tuple(
            slice(o, o + n) for o, n in zip(offset[lead:], local_shape))
        whole[index] = data.reshape(whole[index].shape)
    return full


def compare(case: str, tp: int) -> tuple[dict, dict[str, torch.Tensor]]:
    preset, overrides = CASES[case]
    cfg = load(str(CONFIGS / f"{preset}_tiny.toml"), overrides).model
    torch.manual_seed(0)
    native = HopeLM(cfg)
    init = {k: v.clone() for k, v in native.state_dict().items()}
    torch.manual_seed(123)  # the same on all TP ranks, as megatron-core's CPU initialisation needs
    gpt = build_gpt_model(HopeTransformerConfig(hope=cfg, tensor_model_parallel_size=tp,
                                                use_cpu_initialization=True, params_dtype=torch.float32))
    gpt.load_state_dict(to_megatron(native.state_dict(), cfg, tp)[ps.get_tensor_model_parallel_rank()])
    full = full_tensors(gpt)
    data = batches(cfg.vocab_size)
    native_losses, native_grads = train(native, lambda m, x, y: m(x, targets=y), data)
    megatron_losses, megatron_grads = train(gpt, lambda m, x, y: m(x, None, None, labels=y).mean(), data)
    all_losses = [None] * dist.get_world_size()
    dist.all_gather_object(all_losses, megatron_losses)
    grads = from_megatron(gather_tp(megatron_grads), cfg)
    weights = from_megatron(gather_tp(gpt.state_dict()), cfg)
    grad_rel = max(((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in native_grads.items())
    # Adam turns rounding-level gradient differences into sign flips of lr-sized steps, so the trained
    # weights are compared against the size of the training update itself
    weight_rel = max(((weights[k] - w).norm() / (w - init[k]).norm()).item() for k, w in native.state_dict().items())
    return dict(native=native_losses, megatron=all_losses, grad_rel=grad_rel, weight_rel=weight_rel), full


def reshard_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return -1.0
    return torch.stack([(a[k] - b[k]).abs().max() for k in a]).max().item()  # NaN (a gap left unfilled) stays


def main(out: str) -> None:
    dist.init_process_group("gloo")
    results, full_tp2 = {}, {}
    for tp in (2, 1):
        ps.initialize_model_parallel(tensor_model_parallel_size=tp)
        tensor_parallel.model_parallel_cuda_manual_seed(0, inference_rng_tracker=True, force_reset_rng=True)
        for case in CASES:
            results[f"{case}_tp{tp}"], full = compare(case, tp)
            if tp == 2:
                full_tp2[case] = full
            else:
                results[f"{case}_tp1"]["reshard_max_diff"] = reshard_diff(full_tp2[case], full)
        ps.destroy_model_parallel()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
