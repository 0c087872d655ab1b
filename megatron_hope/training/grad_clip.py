"""Global gradient L2 norm and clipping for gradients that may be DTensors (FSDP2, TP), plain tensors, or a mix.

torch.nn.utils.clip_grad_norm_ fails on a mix ("aten._foreach_norm got mixed torch.Tensor and DTensor"), so the
norm is taken per kind: a DTensor group's norm is reduced over the ranks holding its shards (full_tensor), and
the groups combine as the square root of the summed squares. Each group is then scaled on its own.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Return the global gradient norm over all ranks (fp32 scalar); if max_norm > 0, scale the gradients so
    that their norm is at most max_norm. A non-finite norm leaves the gradients as they are."""
    with_grad = [p for p in params if p.grad is not None]
    groups = [[p for p in with_grad if isinstance(p.grad, DTensor)],
              [p for p in with_grad if not isinstance(p.grad, DTensor)]]
    groups = [g for g in groups if g]
    squares = []
    for group in groups:
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float().square())
    if not squares:
        return torch.zeros(())
    total = torch.stack(squares).sum().sqrt()
    if max_norm > 0 and torch.isfinite(total):
        for group in groups:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=False)
    return total
