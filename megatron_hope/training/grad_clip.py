"""Global gradient L2 norm and clipping for gradients that may be DTensors (FSDP2, TP), plain tensors, or a mix.

torch.nn.utils.clip_grad_norm_ fails on a mix ("aten._foreach_norm got mixed torch.Tensor and DTensor"), so the
norm is taken per layout: a DTensor group's norm is reduced over the ranks holding its shards (full_tensor), and
the groups combine as the square root of the summed squares. Each group is then scaled on its own. Under pipeline
parallelism every rank holds some stages' parameters: the squared norms are summed over the pipeline group, and a
parameter held by two stages (the tied embedding of the first and last stage) is counted once.
"""
from __future__ import annotations

from collections.abc import Collection

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, norm_group: dist.ProcessGroup | None = None,
                   counted_elsewhere: Collection[nn.Parameter] = ()) -> torch.Tensor:
    """Return the global gradient norm over all ranks (fp32 scalar); if max_norm > 0, scale the gradients so
    that their norm is at most max_norm. A non-finite norm leaves the gradients as they are.

    norm_group: ranks holding the other parts of the model (pipeline stages); their squared norms are summed.
    counted_elsewhere: parameters whose gradient another rank of norm_group also holds and counts; scaled here,
    left out of this rank's share of the norm."""
    with_grad = [p for p in params if p.grad is not None]
    skip = {id(p) for p in counted_elsewhere}
    # one group per DTensor layout (mesh and placements: FSDP2 alone, TP alone, both) and one of plain tensors
    by_layout: dict[tuple, list[nn.Parameter]] = {}
    for p in with_grad:
        key = (id(p.grad.device_mesh), tuple(p.grad.placements)) if isinstance(p.grad, DTensor) else ()
        by_layout.setdefault(key, []).append(p)
    groups = list(by_layout.values())
    squares = []
    for group in groups:
        counted = [p.grad for p in group if id(p) not in skip]
        if not counted:
            continue
        norm = torch.nn.utils.get_total_norm(counted, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float().square())
    device = params[0].device if params else torch.device("cpu")
    total = torch.stack(squares).sum() if squares else torch.zeros((), device=device)
    if norm_group is not None:
        dist.all_reduce(total, group=norm_group)
    total = total.sqrt()
    if max_norm > 0 and torch.isfinite(total):
        for group in groups:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=False)
    return total
