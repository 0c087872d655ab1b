"""Transformer-layer ModuleSpecs that put HOPE (and its baselines) into megatron-core's GPTModel.

    spec = get_hope_layer_spec(config)   # or get_layer_spec(config) for config.hope.arch
    model = GPTModel(config, spec, vocab_size=..., max_sequence_length=..., position_embedding_type="none")

Layer structure (TransformerLayer): input_layernorm (RMSNorm) -> self_attention (the mixer) -> residual add
-> pre_mlp_layernorm -> mlp -> residual add. HOPE: mixer = SelfModifyingTitansMixer, pre_mlp_layernorm =
IdentityOp and mlp = ContinuumMemoryMLP (each CMS level brings its own norm). Titans: TitansMixer and
megatron-core's SwiGLU MLP. Transformer++: megatron-core's SelfAttention with RotarySDPAttention and its
SwiGLU MLP. None uses a position embedding from GPTModel.
"""
from __future__ import annotations

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel import get_forward_backward_func as _mcore_forward_backward_func
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_hope.integrations.megatron_core.attention import RotarySDPAttention
from megatron_hope.integrations.megatron_core.cms import CMSSubmodules, ContinuumMemoryMLP
from megatron_hope.integrations.megatron_core.config import (HopeTransformerConfig, UnsupportedByPlugin,
                                                             check_runnable_here)
from megatron_hope.integrations.megatron_core.mixers import MixerSubmodules, SelfModifyingTitansMixer, TitansMixer

Norm = ModuleSpec | type


def _swiglu_mlp() -> ModuleSpec:
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                           linear_fc2=RowParallelLinear))


def _layer(norm: Norm, self_attention: ModuleSpec, pre_mlp_layernorm: Norm, mlp: ModuleSpec) -> ModuleSpec:
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=norm, self_attention=self_attention, self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=pre_mlp_layernorm, mlp=mlp, mlp_bda=get_bias_dropout_add))


def get_hope_layer_spec(config: HopeTransformerConfig, norm: Norm = WrappedTorchNorm) -> ModuleSpec:
    """HOPE layer: x += SelfModifyingTitans(RMSNorm(x)); x = CMS(x). `norm` is megatron-core's torch RMSNorm
    by default; pass TENorm on GPUs with sequence parallelism (the torch norm refuses it)."""
    check_runnable_here(config)
    return _layer(norm, ModuleSpec(module=SelfModifyingTitansMixer, submodules=MixerSubmodules()), IdentityOp,
                  ModuleSpec(module=ContinuumMemoryMLP, submodules=CMSSubmodules(norm=norm, mlp=_swiglu_mlp())))


def get_titans_layer_spec(config: HopeTransformerConfig, norm: Norm = WrappedTorchNorm) -> ModuleSpec:
    """Titans baseline layer: x += TitansMixer(RMSNorm(x)); x += SwiGLU(RMSNorm(x))."""
    check_runnable_here(config)
    return _layer(norm, ModuleSpec(module=TitansMixer, submodules=MixerSubmodules()), norm, _swiglu_mlp())


def get_transformerpp_layer_spec(config: HopeTransformerConfig, norm: Norm = WrappedTorchNorm) -> ModuleSpec:
    """Transformer++ baseline layer: x += Attn(RMSNorm(x)) with RoPE; x += SwiGLU(RMSNorm(x))."""
    check_runnable_here(config)
    attention = ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                           submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear,
                                                              core_attention=RotarySDPAttention,
                                                              linear_proj=RowParallelLinear))
    return _layer(norm, attention, norm, _swiglu_mlp())


_SPECS = {"hope": get_hope_layer_spec, "titans": get_titans_layer_spec,
          "transformerpp": get_transformerpp_layer_spec}


def get_layer_spec(config: HopeTransformerConfig, norm: Norm = WrappedTorchNorm) -> ModuleSpec:
    """The layer spec of config.hope.arch."""
    return _SPECS[config.hope.arch](config, norm)


def build_gpt_model(config: HopeTransformerConfig, **kwargs) -> GPTModel:
    """megatron-core's GPTModel with the layer of config.hope.arch and the native model's vocabulary, length
    and embedding tying; kwargs (pre_process, post_process, vp_stage, ...) go to GPTModel."""
    hope = config.hope
    return GPTModel(config, get_layer_spec(config), vocab_size=hope.vocab_size,
                    max_sequence_length=hope.max_seq_len, position_embedding_type="none",
                    share_embeddings_and_output_weights=hope.tie_embeddings, **kwargs)


def get_forward_backward_func():
    """megatron-core's pipeline schedule for the current parallel state; without CUDA a clear error instead
    of the schedules' CUDA allocation failure (even at pipeline size 1)."""
    if not torch.cuda.is_available():
        raise UnsupportedByPlugin("megatron-core's forward/backward schedules allocate on CUDA; on CPU call the "
                                  "model directly (loss = model(tokens, None, None, labels=labels)) and "
                                  "backward yourself")
    return _mcore_forward_backward_func()
