"""Residual blocks of the three architectures. Each maps (x, doc_start, state) -> (x, state), where state is the
token mixer's carried memory state (None for attention, which carries nothing between calls)."""
from __future__ import annotations

import torch
from torch import nn

from megatron_hope.config import ModelConfig
from megatron_hope.model.attention import CausalSelfAttention
from megatron_hope.model.cms import ContinuumMemory, FastWeights
from megatron_hope.model.layers import RMSNorm, SwiGLU
from megatron_hope.model.titans import MixerState, SelfModifyingTitans, TitansMixer


class HopeBlock(nn.Module):
    """Spec 1.1: x += SMT(RMSNorm(x)); then the CMS chain, each level with its own pre-norm and residual."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = SelfModifyingTitans(cfg)
        self.cms = ContinuumMemory(cfg)

    def forward(self, x: torch.Tensor, doc_start: torch.Tensor | None = None, state: MixerState | None = None,
                cms_weights: dict[int, FastWeights] | None = None) -> tuple[torch.Tensor, MixerState]:
        """cms_weights: per-sequence fast weights of the CMS levels that adapt in-sequence (see cms.py)."""
        o, state = self.mixer(self.mixer_norm(x), doc_start, state)
        return self.cms(x + o, cms_weights), state


class TitansBlock(nn.Module):
    """Titans baseline (non-self-modifying neural memory): x += Mixer(norm(x)); x += SwiGLU(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = TitansMixer(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, doc_start: torch.Tensor | None = None, state: MixerState | None = None
                ) -> tuple[torch.Tensor, MixerState]:
        o, state = self.mixer(self.mixer_norm(x), doc_start, state)
        x = x + o
        return x + self.mlp(self.mlp_norm(x)), state


class TransformerPPBlock(nn.Module):
    """Transformer++ (Llama-style): x += Attn(norm(x)); x += SwiGLU(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, doc_start: torch.Tensor | None = None, state: None = None
                ) -> tuple[torch.Tensor, None]:
        x = x + self.attn(self.attn_norm(x), doc_start)
        return x + self.mlp(self.mlp_norm(x)), None


BLOCKS: dict[str, type[nn.Module]] = {"hope": HopeBlock, "titans": TitansBlock, "transformerpp": TransformerPPBlock}
