"""Continuum Memory System (spec 1.1 step 4, 1.4): a chain of SwiGLU levels, each x <- x + MLP_l(RMSNorm(x)).

Each level's parameters live under `...cms.levels.{l}.` so that a trainer can find a level by parameter name
(`cms_level_of`) and give it its own outer period; names survive wrapping, attributes on Parameters would not.

In-sequence fast-weight updates (spec 1.4 proposal) are driven from the LM (they need the next-token loss); here
a level only has to read with per-sequence fast weights: `weights` maps the level MLP's parameter names
("w_gate.weight", ...) to tensors with a leading batch dimension, one copy of the weights per sequence.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vmap

from megatron_hope.config import ModelConfig
from megatron_hope.model.layers import RMSNorm, SwiGLU

FastWeights = dict[str, torch.Tensor]


class CMSLevel(nn.Module):
    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor, weights: FastWeights | None = None) -> torch.Tensor:
        h = self.norm(x)
        if weights is None:
            return x + self.mlp(h)
        # one MLP per sequence: map over the batch dimension of both the weights and the input
        return x + vmap(lambda w, hb: functional_call(self.mlp, w, (hb,)))(weights, h)


class ContinuumMemory(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.levels = nn.ModuleList(CMSLevel(cfg.d_model, lvl.hidden, cfg.norm_eps) for lvl in cfg.cms.levels)

    def forward(self, x: torch.Tensor, weights: dict[int, FastWeights] | None = None) -> torch.Tensor:
        """weights: fast weights by level index for the levels that adapt in-sequence; other levels use their own."""
        for l, level in enumerate(self.levels):
            x = level(x, None if weights is None else weights.get(l))
        return x


def cms_level_of(param_name: str) -> int | None:
    """CMS level index of a parameter from its qualified name, or None if it belongs to no CMS level.

    Wrapper segments that start with '_' (_fsdp_wrapped_module, _checkpoint_wrapped_module, _orig_mod) are skipped,
    so the answer is the same before and after FSDP, activation checkpointing or torch.compile wrapping.
    """
    parts = [p for p in param_name.split(".") if not p.startswith("_")]
    for i in range(len(parts) - 2):
        if parts[i] == "cms" and parts[i + 1] == "levels" and parts[i + 2].isdigit():
            return int(parts[i + 2])
    return None


def parameter_levels(model: nn.Module) -> dict[str, int]:
    """{parameter name: CMS level} for every parameter of `model` that belongs to a CMS level."""
    levels = {name: cms_level_of(name) for name, _ in model.named_parameters()}
    return {name: lvl for name, lvl in levels.items() if lvl is not None}
