"""Pending (not yet reduced) FSDP2 gradients out of one unit and into another (what a checkpoint taken in the
middle of a CMS level's period saves and restores): with fp32 parameters and under bf16 mixed precision, where
FSDP2 keeps the accumulator in fp32 beside the parameter. The next synchronised step's reduced gradients of the
restored unit equal the original's."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from megatron_hope.parallel.data_parallel import accumulated_gradients, set_accumulated_gradients


def unit(mesh, policy: MixedPrecisionPolicy) -> nn.Module:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16, bias=False), nn.SiLU(), nn.Linear(16, 8))
    fully_shard(module, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    return module


def backward(module: nn.Module, seed: int, sync: bool) -> None:
    module.set_requires_gradient_sync(sync)
    module.set_reshard_after_backward(sync)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))
    module(x).square().sum().backward()


@pytest.mark.parametrize("policy,acc_dtype", [(MixedPrecisionPolicy(), torch.float32),
                                              (MixedPrecisionPolicy(torch.bfloat16, torch.float32), torch.float32)],
                         ids=["fp32", "bf16_params_fp32_reduce"])
def test_accumulated_gradients_move_between_units(one_rank_mesh, policy, acc_dtype):
    original, restored = unit(one_rank_mesh, policy), unit(one_rank_mesh, policy)
    for seed in (1, 2):
        backward(original, seed, sync=False)
    pending = accumulated_gradients(original)
    assert sorted(pending) == ["0.weight", "2.bias", "2.weight"]
    assert all(g.dtype == acc_dtype and g.abs().sum() > 0 for g in pending.values())
    set_accumulated_gradients(restored, pending)
    for module in (original, restored):
        backward(module, 3, sync=True)
    for (name, a), (_, b) in zip(original.named_parameters(), restored.named_parameters(), strict=True):
        assert torch.equal(a.grad.full_tensor(), b.grad.full_tensor()), name
    fresh = unit(one_rank_mesh, policy)  # without the restored accumulator the step's gradient differs
    backward(fresh, 3, sync=True)
    assert not torch.equal(fresh[0].weight.grad.full_tensor(), original[0].weight.grad.full_tensor())
