"""The megatron-core TransformerConfig for HOPE and its baselines, and what the plug-in refuses up front.

`HopeTransformerConfig(hope=<ModelConfig>, tensor_model_parallel_size=..., ...)` carries the native model
config (memory, CMS, conv width, RoPE base) and derives megatron-core's shape fields from it, so one TOML
preset drives both stacks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from megatron.core.utils import scaled_init_method_normal

from megatron_hope.config import ConfigError, ModelConfig


class UnsupportedByPlugin(ConfigError):
    """A megatron-core feature that this plug-in, or megatron-core on this machine, cannot provide."""


def residual_branches(hope: ModelConfig) -> int:
    """Residual branches per layer: the mixer plus one per CMS level (HOPE) or the MLP (baselines)."""
    return 1 + (len(hope.cms.levels) if hope.arch == "hope" else 1)


def _derived(hope: ModelConfig) -> dict:
    """megatron-core fields that follow from the native config (the native blocks are pre-norm RMSNorm with
    bias-free SwiGLU MLPs)."""
    return dict(num_layers=hope.n_layers, hidden_size=hope.d_model, num_attention_heads=hope.n_heads,
                ffn_hidden_size=hope.ffn_hidden, normalization="RMSNorm", layernorm_epsilon=hope.norm_eps,
                gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                init_method_std=hope.init_std)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}


@dataclass
class HopeTransformerConfig(TransformerConfig):
    """TransformerConfig plus the native ModelConfig. The shape fields (num_layers, hidden_size, heads,
    ffn_hidden_size, norm, activation, init std) come from `hope`; setting one of them to another value is
    an error. Dropout defaults to 0 as in the native model."""

    hope: ModelConfig = field(default_factory=ModelConfig)
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        self.hope.validate("hope")
        for name, value in _derived(self.hope).items():
            given = getattr(self, name)
            if given != value and given != _DEFAULTS[name]:
                raise ConfigError(f"{name} = {given!r} contradicts hope ({value!r}); set it through the "
                                  f"HOPE model config (hope.{name}) or leave it unset")
            setattr(self, name, value)
        if self.output_layer_init_method is None:  # as HopeLM.init_weights: std / sqrt(branches * layers)
            self.output_layer_init_method = scaled_init_method_normal(
                self.init_method_std, self.num_layers, multiplier=residual_branches(self.hope))
        super().__post_init__()
        if self.hope.cms.inner_updates:
            raise UnsupportedByPlugin("hope.cms.inner_updates = true: in-sequence CMS updates need the "
                                      "next-token loss inside the forward (HopeLM.forward_inner_updates), which "
                                      "megatron-core's GPTModel does not expose; set it to false")
        if self.context_parallel_size > 1:
            raise UnsupportedByPlugin(f"context_parallel_size = {self.context_parallel_size}: the plug-in does not "
                                      "hand memory states across sequence shards (hope_spec 2.7); set it to 1")
        if self.hope.vocab_size % self.tensor_model_parallel_size:
            raise ConfigError(f"hope.vocab_size = {self.hope.vocab_size} must be a multiple of "
                              f"tensor_model_parallel_size = {self.tensor_model_parallel_size} "
                              "(VocabParallelEmbedding splits the vocabulary evenly)")


def check_runnable_here(config: HopeTransformerConfig) -> None:
    """Without CUDA, refuse the megatron-core features whose code allocates on CUDA, naming each and its fix,
    instead of letting megatron-core fail later with 'Torch not compiled with CUDA enabled'."""
    if torch.cuda.is_available():
        return
    problems = []
    if config.sequence_parallel:
        problems.append("sequence_parallel = True: megatron-core's sequence-parallel collectives allocate on "
                        "CUDA (and its CPU norm refuses it); set sequence_parallel = False")
    if config.pipeline_model_parallel_size > 1:
        problems.append(f"pipeline_model_parallel_size = {config.pipeline_model_parallel_size}: megatron-core's "
                        "pipeline schedules allocate on CUDA; set it to 1 (or use megatron_hope's torch-native "
                        "pipeline parallelism)")
    if not config.use_cpu_initialization:
        problems.append("use_cpu_initialization = False: megatron-core then creates weights on the current CUDA "
                        "device; set use_cpu_initialization = True")
    if problems:
        raise UnsupportedByPlugin("megatron-core cannot run this on a machine without CUDA:\n  - "
                                  + "\n  - ".join(problems))
