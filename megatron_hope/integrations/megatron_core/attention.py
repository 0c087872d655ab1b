"""A core_attention submodule for megatron-core's SelfAttention: the native Transformer++'s RoPE + causal SDPA.

megatron-core's DotProductAttention and its rotary embedding allocate on CUDA; this module applies the
native model's (interleaved) RoPE to the per-head queries and keys itself and calls torch SDPA, so the
Transformer++ baseline runs anywhere, with GPTModel's position_embedding_type = "none".
"""
from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from megatron_hope.integrations.megatron_core.config import HopeTransformerConfig, UnsupportedByPlugin
from megatron_hope.model.layers import RotaryEmbedding


class RotarySDPAttention(MegatronModule):
    def __init__(self, config: HopeTransformerConfig, layer_number: int, attn_mask_type=None, attention_type=None,
                 cp_comm_type=None, softmax_scale=None, pg_collection=None):
        super().__init__(config)
        hope = config.hope
        self.rope = RotaryEmbedding(hope.head_dim, hope.max_seq_len, hope.rope_theta)
        self.scale = softmax_scale

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None = None, *,
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> Tensor:
        """q, k, v [s, b, heads, d] -> [s, b, heads * d]; causal, so attention_mask is not used."""
        if packed_seq_params is not None or attention_bias is not None:
            raise UnsupportedByPlugin("RotarySDPAttention takes plain causal [s, b, h] batches "
                                      "(no packed_seq_params, no attention_bias)")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # (b, heads, s, d)
        y = F.scaled_dot_product_attention(self.rope(q), self.rope(k), v, is_causal=True, scale=self.scale)
        return y.permute(2, 0, 1, 3).flatten(2)
