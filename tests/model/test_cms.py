"""Continuum Memory System: the level chain against the math, per-sequence fast weights, level tagging by name."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from megatron_hope.model.cms import ContinuumMemory, cms_level_of, parameter_levels


def chain_reference(cms: ContinuumMemory, x: torch.Tensor, eps: float) -> torch.Tensor:
    """x <- x + W_down (silu(W_gate n) * (W_up n)), n = x / rms(x) * g, level after level."""
    for level in cms.levels:
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * level.norm.weight
        m = level.mlp
        x = x + (F.silu(n @ m.w_gate.weight.T) * (n @ m.w_up.weight.T)) @ m.w_down.weight.T
    return x


def randomized_cms(tiny) -> tuple[ContinuumMemory, float]:
    cfg = tiny("hope")
    torch.manual_seed(0)
    cms = ContinuumMemory(cfg).double()
    with torch.no_grad():
        for p in cms.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return cms, cfg.norm_eps


def test_chain_matches_reference(tiny):
    cms, eps = randomized_cms(tiny)
    assert [lvl.mlp.w_gate.out_features for lvl in cms.levels] == [64, 48, 32]
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    torch.testing.assert_close(cms(x), chain_reference(cms, x, eps), rtol=1e-12, atol=1e-12)


def test_per_sequence_fast_weights(tiny):
    """Level 1 reads with a different weight copy per sequence: each row equals the chain with that copy."""
    cms, eps = randomized_cms(tiny)
    x = torch.randn(3, 7, 64, dtype=torch.float64)
    own = dict(cms.levels[1].mlp.named_parameters())
    copies = {n: torch.randn(3, *p.shape, dtype=torch.float64) * 0.3 for n, p in own.items()}
    out = cms(x, {1: copies})
    for b in range(3):
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(copies[n][b])
        torch.testing.assert_close(out[b], chain_reference(cms, x[b], eps), rtol=1e-12, atol=1e-12)
    # the batched path with the level's own weights broadcast is the static path
    same = {n: p.expand(3, *p.shape) for n, p in own.items()}
    torch.testing.assert_close(cms(x, {1: same}), cms(x), rtol=1e-12, atol=1e-12)


def test_level_names_survive_wrapping(tiny):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.cms = ContinuumMemory(tiny("hope"))

    model = nn.Sequential(Block(), checkpoint_wrapper(Block()))
    levels = parameter_levels(model)
    # every CMS parameter (3 levels x (norm + 3 matrices) per block), nothing else
    assert len(levels) == 2 * 3 * 4
    assert all(".cms." in n for n in levels) and not any("proj" in n for n in levels)
    assert levels["1._checkpoint_wrapped_module.cms.levels.2.mlp.w_down.weight"] == 2
    assert levels["0.cms.levels.0.norm.weight"] == 0
    assert cms_level_of("module.blocks.3._fsdp_wrapped_module.cms._orig_mod.levels.1.mlp.w_up.weight") == 1
    assert cms_level_of("_orig_mod.blocks.3.cms.levels.12.norm.weight") == 12
    assert cms_level_of("blocks.3.mixer.levels.1.weight") is None
    assert cms_level_of("blocks.3.cms.levels.weight") is None
