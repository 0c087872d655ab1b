"""HOPE, Titans and Transformer++ layers as megatron-core (0.16.1) ModuleSpecs for its GPTModel.

Needs megatron-core installed. See docs/megatron_core.md for how a Megatron-LM user plugs the spec in.
"""
from megatron_hope.integrations.megatron_core.config import (HopeTransformerConfig, UnsupportedByPlugin,
                                                             check_runnable_here)
from megatron_hope.integrations.megatron_core.specs import (build_gpt_model, get_forward_backward_func,
                                                            get_hope_layer_spec, get_layer_spec,
                                                            get_titans_layer_spec, get_transformerpp_layer_spec)
from megatron_hope.integrations.megatron_core.weights import from_megatron, to_megatron

__all__ = ["HopeTransformerConfig", "UnsupportedByPlugin", "check_runnable_here", "build_gpt_model",
           "get_forward_backward_func", "get_hope_layer_spec", "get_layer_spec", "get_titans_layer_spec",
           "get_transformerpp_layer_spec", "from_megatron", "to_megatron"]
