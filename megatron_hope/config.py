"""The project's configuration: typed sections, loaded from TOML with dotted overrides (see config_base)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_hope.config_base import ConfigError, load_config

Readout = Literal["after_write", "before_write", "chunk_start"]


@dataclass
class MemoryConfig:
    """The self-modifying Titans memories (hope_spec.md 1.2-1.3, 2.1-2.4)."""

    kind: Literal["mlp", "linear"] = "mlp"  # residual 2-layer MLP z + A s(B z), or a matrix memory
    hidden_mult: int = 2  # MLP memory hidden width m = hidden_mult * head_dim
    chunk_size: int = 64  # tokens whose inner gradients share one chunk-start state
    momentum: bool = True  # S_t = beta_t S_{t-1} + g_t (spec project decisions)
    momentum_form: Literal["hope", "titans"] = "hope"  # titans: S_t = beta S - eta g, M_t = alpha M + S
    readout: Readout = "after_write"  # spec 1.3 reading B (dual form); chunk_start = reading A
    dgd: Literal["first", "each"] = "first"  # MLP memory: DGD factor on B only (i) or on each layer (ii)
    adaptive_q: bool = False  # q from a memory M_q instead of a static projection
    differentiable_writes: bool = True  # outer gradient flows through the inner updates (spec 2.4)
    eta_max: float = 0.5  # eta_t = eta_max * sigmoid(.)
    alpha_bias_init: float = 5.0  # alpha_t = sigmoid(. + bias): starts near 1 (little forgetting)
    activation: Literal["silu", "gelu"] = "silu"
    impl: Literal["chunked", "sequential"] = "chunked"  # sequential = the token-by-token oracle

    def validate(self, path: str = "model.memory") -> None:
        if self.chunk_size < 1:
            raise ConfigError(f"{path}.chunk_size = {self.chunk_size} must be >= 1")
        if self.hidden_mult < 1:
            raise ConfigError(f"{path}.hidden_mult = {self.hidden_mult} must be >= 1")
        if not 0.0 < self.eta_max <= 1.0:
            raise ConfigError(f"{path}.eta_max = {self.eta_max} must be in (0, 1] so that the DGD factor "
                              "alpha I - eta k k^T stays a contraction for unit keys")


@dataclass
class CMSLevel:
    """One Continuum Memory System level: an MLP with its own width and update periods (spec 1.4)."""

    hidden: int = 512
    period: int = 1  # outer period K_l in optimizer steps (schedule-aware accumulation)
    inner_chunk: int = 0  # in-sequence fast-weight update every inner_chunk tokens (0 = static level)


@dataclass
class CMSConfig:
    levels: list[CMSLevel] = field(default_factory=lambda: [CMSLevel(512, 1), CMSLevel(512, 4), CMSLevel(512, 16)])
    inner_updates: bool = False  # in-sequence first-order fast-weight updates (spec 1.4 proposal); off in pretraining
    inner_lr: float = 1e-2

    def validate(self, path: str = "model.cms") -> None:
        if not self.levels:
            raise ConfigError(f"{path}.levels is empty; give at least one [[{path}.levels]] table")
        for i, lvl in enumerate(self.levels):
            if lvl.hidden < 1:
                raise ConfigError(f"{path}.levels[{i}].hidden = {lvl.hidden} must be >= 1")
            if lvl.period < 1:
                raise ConfigError(f"{path}.levels[{i}].period = {lvl.period} must be >= 1 optimizer steps")
            if lvl.inner_chunk < 0:
                raise ConfigError(f"{path}.levels[{i}].inner_chunk = {lvl.inner_chunk} must be >= 0")
        if self.inner_lr < 0:
            raise ConfigError(f"{path}.inner_lr = {self.inner_lr} must be >= 0")
        if self.inner_updates and not any(lvl.inner_chunk > 0 for lvl in self.levels):
            raise ConfigError(f"{path}.inner_updates = true but every level has inner_chunk = 0; "
                              "set inner_chunk > 0 on the levels that should adapt in-sequence")
        # the sequence is processed in chunks of the smallest inner_chunk; a level can only step at chunk ends
        step = self.inner_chunk
        for i, lvl in enumerate(self.levels):
            if lvl.inner_chunk and lvl.inner_chunk % step:
                raise ConfigError(f"{path}.levels[{i}].inner_chunk = {lvl.inner_chunk} is not a multiple of the "
                                  f"smallest inner_chunk {step}; levels step at ends of {step}-token chunks")

    @property
    def inner_chunk(self) -> int:
        """Chunk length of the in-sequence update loop: the smallest non-zero inner_chunk (0 if none)."""
        return min((lvl.inner_chunk for lvl in self.levels if lvl.inner_chunk > 0), default=0)


@dataclass
class ModelConfig:
    arch: Literal["hope", "titans", "transformerpp"] = "hope"
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    max_seq_len: int = 2048
    ffn_hidden: int = 1408  # SwiGLU hidden width of the Transformer++ and Titans baselines
    conv_width: int = 4  # short causal depthwise conv on q/k/v (spec 1.1)
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    cms: CMSConfig = field(default_factory=CMSConfig)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self, path: str = "model") -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "ffn_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name} = {getattr(self, name)} must be >= 1")
        if self.d_model % self.n_heads:
            raise ConfigError(f"{path}.n_heads = {self.n_heads} does not divide {path}.d_model = {self.d_model}; "
                              f"pick n_heads among the divisors of d_model")
        if self.arch == "transformerpp" and self.head_dim % 2:
            raise ConfigError(f"{path}: head_dim = d_model / n_heads = {self.head_dim} must be even for RoPE")
        if self.conv_width < 1:
            raise ConfigError(f"{path}.conv_width = {self.conv_width} must be >= 1 (1 = no mixing)")
        if self.init_std <= 0:
            raise ConfigError(f"{path}.init_std = {self.init_std} must be > 0")
        self.memory.validate(f"{path}.memory")
        self.cms.validate(f"{path}.cms")
        if self.cms.inner_updates and self.arch != "hope":
            raise ConfigError(f"{path}.cms.inner_updates = true needs {path}.arch = 'hope' "
                              f"(arch {self.arch!r} has no CMS); set it to false")


@dataclass
class Config:
    """Top-level run configuration; each section is one [table] of the TOML file."""

    model: ModelConfig = field(default_factory=ModelConfig)

    def validate(self) -> None:
        self.model.validate()


def load(path: str | None = None, overrides: list[str] | None = None) -> Config:
    return load_config(Config, path, overrides)
