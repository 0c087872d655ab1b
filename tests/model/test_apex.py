"""apex is optional: its fused RMSNorm is picked up when importable, and torch's kernel is used otherwise."""
import sys
import types

import torch

from megatron_hope.model import layers


def test_apex_rms_norm_is_detected(monkeypatch):
    def fused_rms_norm_affine(x, weight, shape, eps):
        return torch.nn.functional.rms_norm(x, shape, weight, eps)

    module = types.ModuleType("apex.normalization.fused_layer_norm")
    module.fused_rms_norm_affine = fused_rms_norm_affine
    for name in ("apex", "apex.normalization"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "apex.normalization.fused_layer_norm", module)
    assert layers.apex_rms_norm() is fused_rms_norm_affine


def test_without_apex_torch_kernel_is_used(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)  # import apex -> ImportError
    assert layers.apex_rms_norm() is None
    norm = layers.RMSNorm(8)
    x = torch.randn(2, 8)
    expected = x / x.pow(2).mean(-1, keepdim=True).add(norm.eps).sqrt()
    torch.testing.assert_close(norm(x), expected)
