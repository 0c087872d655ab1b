"""Transformer++ attention against the math written out: per document, RoPE from position 0, causal softmax."""
from __future__ import annotations

import math

import torch

from megatron_hope.model.attention import CausalSelfAttention, document_causal_mask


def rope_reference(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x (H, T, D): rotate each pair (x[2i], x[2i+1]) by angle pos * theta^(-2i/D), as complex numbers."""
    H, T, D = x.shape
    freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freq
    z = torch.view_as_complex(x.reshape(H, T, D // 2, 2).contiguous()) * torch.polar(torch.ones_like(angle), angle)
    return torch.view_as_real(z).reshape(H, T, D)


def attention_reference(attn: CausalSelfAttention, x: torch.Tensor, theta: float) -> torch.Tensor:
    """One document (T, d), no batch: explicit scores, causal mask, softmax."""
    T, d = x.shape
    H = d // attn.head_dim
    q, k, v = ((x @ w.weight.T).view(T, H, -1).transpose(0, 1) for w in (attn.wq, attn.wk, attn.wv))
    q, k = rope_reference(q, theta), rope_reference(k, theta)
    scores = q @ k.transpose(1, 2) / math.sqrt(d // H)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.softmax(scores, -1) @ v
    return y.transpose(0, 1).reshape(T, d) @ attn.wo.weight.T


def test_attention_matches_reference_per_document(tiny):
    cfg = tiny("transformerpp")
    torch.manual_seed(0)
    attn = CausalSelfAttention(cfg).double()
    x = torch.randn(2, 40, cfg.d_model, dtype=torch.float64)
    doc_start = torch.zeros(2, 40, dtype=torch.bool)
    doc_start[:, 0] = True
    doc_start[0, 13] = doc_start[0, 30] = doc_start[1, 1] = True
    out = attn(x, doc_start)
    for b in range(2):
        bounds = doc_start[b].nonzero().flatten().tolist() + [40]
        for s, e in zip(bounds[:-1], bounds[1:]):
            ref = attention_reference(attn, x[b, s:e], cfg.rope_theta)
            torch.testing.assert_close(out[b, s:e], ref, rtol=1e-6, atol=1e-6)  # RoPE tables are fp32
    # without documents (or with a start at 0 only) it is plain causal attention over the whole row
    plain = attn(x)
    starts_at_zero = torch.zeros_like(doc_start)
    starts_at_zero[:, 0] = True
    torch.testing.assert_close(attn(x, starts_at_zero), plain, rtol=0, atol=0)
    for b in range(2):
        ref = attention_reference(attn, x[b], cfg.rope_theta)
        torch.testing.assert_close(plain[b], ref, rtol=1e-6, atol=1e-6)


def test_document_causal_mask():
    doc_start = torch.tensor([[True, False, True, False]])
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(document_causal_mask(doc_start)[0, 0], expected)
