"""Causal softmax self-attention with RoPE: the Transformer++ token mixer (and Hope-Attention's, spec 1.1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_hope.config import ModelConfig
from megatron_hope.model.layers import RotaryEmbedding, positions_from_doc_start


def document_causal_mask(doc_start: torch.Tensor) -> torch.Tensor:
    """(B, T) bool document starts -> (B, 1, T, T) bool mask: query i sees key j iff j <= i in the same document."""
    doc_id = torch.cumsum(doc_start.long(), dim=1)
    T = doc_start.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_start.device).tril()
    same_doc = doc_id[:, :, None] == doc_id[:, None, :]
    return (same_doc & causal)[:, None]


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention; with `doc_start`, RoPE positions restart and attention stays inside a document."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)

    def forward(self, x: torch.Tensor, doc_start: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (w(x).view(B, T, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        positions = None if doc_start is None else positions_from_doc_start(doc_start)
        q, k = self.rope(q, positions), self.rope(k, positions)
        if doc_start is not None:  # no host sync here: HopeLM drops doc_start when no document starts inside
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(doc_start))
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # this rank's heads under TP
