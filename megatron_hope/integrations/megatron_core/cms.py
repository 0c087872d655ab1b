"""HOPE's Continuum Memory System as megatron-core's MLP submodule.

Each level is megatron-core's SwiGLU MLP (column-parallel gate+up, row-parallel down) behind its own RMSNorm,
with its own residual, as in model/cms.py. The layer's pre_mlp_layernorm is IdentityOp (the levels norm
themselves), this module sees the raw residual stream x, and it returns the sum of the levels' branches, which
the layer's bias-dropout-add puts back onto x. Static levels only: in-sequence CMS updates need the LM loss
inside the forward, which GPTModel does not offer (config.py refuses them).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import Tensor, nn

from megatron_hope.integrations.megatron_core.config import HopeTransformerConfig


@dataclass
class CMSSubmodules:
    norm: ModuleSpec | type  # each level's pre-norm (built with normalization = "RMSNorm")
    mlp: ModuleSpec | type  # each level's MLP: megatron-core's MLP with a gated linear unit


class CMSLevel(MegatronModule):
    def __init__(self, config: HopeTransformerConfig, submodules: CMSSubmodules, hidden: int, tp_group):
        super().__init__(config)
        # megatron-core's MLP sizes its down projection from config.ffn_hidden_size, so each level gets a
        # copy of the config with its own width (as megatron-core's shared experts do)
        level_config = copy.copy(config)
        level_config.ffn_hidden_size = hidden
        self.norm = build_module(submodules.norm, config=config, hidden_size=config.hidden_size,
                                 eps=config.layernorm_epsilon)
        self.mlp = build_module(submodules.mlp, config=level_config, ffn_hidden_size=hidden, tp_group=tp_group)

    def forward(self, x: Tensor) -> Tensor:
        """The level's residual branch MLP(norm(x))."""
        y, _ = self.mlp(self.norm(x))
        return y


class ContinuumMemoryMLP(MegatronModule):
    def __init__(self, config: HopeTransformerConfig, submodules: CMSSubmodules, tp_group=None):
        super().__init__(config)
        tp_group = tp_group or parallel_state.get_tensor_model_parallel_group()
        self.levels = nn.ModuleList(CMSLevel(config, submodules, lvl.hidden, tp_group)
                                    for lvl in config.hope.cms.levels)

    def forward(self, hidden_states: Tensor, **kwargs) -> tuple[Tensor, None]:
        """x [s, b, h] -> (sum of the level branches, no bias): x + output = level_L(... level_1(x))."""
        x, branches = hidden_states, 0
        for level in self.levels:
            y = level(x)
            x, branches = x + y, branches + y
        return branches, None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
                           ) -> ShardedStateDict:
        """Recurse into the levels (megatron-core's default would treat a ModuleList as replicated)."""
        sharded = {}
        for i, level in enumerate(self.levels):
            sharded.update(level.sharded_state_dict(f"{prefix}levels.{i}.", sharded_offsets, metadata))
        return sharded
