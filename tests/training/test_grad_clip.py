"""clip_grad_norm on a mix of DTensor and plain gradients (torch's clip_grad_norm_ rejects the mix) equals
torch's clipping of the same gradients as plain tensors."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from megatron_hope.training.grad_clip import clip_grad_norm


def make_grads(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in [(6, 4), (5,), (3, 3, 2)]]


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 100.0])
def test_mixed_dtensor_and_plain_grads(one_rank_mesh, max_norm):
    grads = make_grads(0)
    reference = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(reference, grads):
        p.grad = g.clone()
    expected = torch.nn.utils.clip_grad_norm_(reference, max_norm if max_norm > 0 else float("inf"))
    mixed = []
    for i, g in enumerate(grads):
        p = nn.Parameter(torch.zeros_like(g))
        p.grad = distribute_tensor(g.clone(), one_rank_mesh, [Shard(0)]) if i % 2 == 0 else g.clone()
        mixed.append(p)
    assert isinstance(mixed[0].grad, DTensor) and not isinstance(mixed[1].grad, DTensor)
    total = clip_grad_norm(mixed, max_norm)
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
    for p, ref in zip(mixed, reference):
        got = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        torch.testing.assert_close(got, ref.grad, rtol=1e-6, atol=1e-7)


def test_non_finite_norm_leaves_gradients_alone():
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, float("nan"), 2.0])
    assert torch.isnan(clip_grad_norm([p], 0.5))
    assert p.grad[0] == 1.0 and p.grad[2] == 2.0
