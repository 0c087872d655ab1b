"""The analytic FLOPs per token against torch.utils.flop_counter on the tiny presets."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from megatron_hope.model.summary import forward_flops_per_token, training_flops_per_token

aten = torch.ops.aten
B, T = 2, 64


def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# the counter knows the CUDA attention kernels only; count the CPU one with the same formulas
CPU_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward}


def counted(fn) -> float:
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        fn()
    return counter.get_total_flops() / (B * T)


@pytest.mark.parametrize("arch", ["hope", "titans", "transformerpp"])
def test_forward_flops(build, tiny, arch):
    model = build(arch, dtype=torch.float32)
    tokens = torch.randint(0, 512, (B, T))
    with torch.no_grad():
        measured = counted(lambda: model(tokens))
    assert measured == pytest.approx(forward_flops_per_token(tiny(arch), T), rel=0.05)


@pytest.mark.parametrize("arch", ["hope", "titans", "transformerpp"])
def test_training_flops_are_three_times_forward(build, tiny, arch):
    model = build(arch, dtype=torch.float32)
    tokens = torch.randint(0, 512, (B, T))
    measured = counted(lambda: model(tokens, targets=tokens).backward())
    assert measured == pytest.approx(training_flops_per_token(tiny(arch), T), rel=0.05)
