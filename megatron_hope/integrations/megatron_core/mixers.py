"""HOPE's self-modifying Titans mixer and the Titans mixer as megatron-core self-attention submodules.

Each tensor-parallel rank holds H/tp whole heads: the input projection is column-parallel with a head-major
output layout [head, stream, w] (the native in_proj is stream-major [stream, head, w]; weights.py permutes),
the depthwise conv shards with those channels, the gate and per-head scalar projections are column-parallel,
the output projection is row-parallel, and every per-head parameter (memory inits, gate readouts) keeps this
rank's slice of its leading head dim. The inner loop is megatron_hope.ops, as in the native mixers.

megatron-core's GPTModel passes no document starts, so the memories run without resets (one document per
sequence, or packed documents that see each other through the memories).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                           copy_to_tensor_model_parallel_region,
                                           set_tensor_model_parallel_attributes)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from megatron.core.utils import get_pg_rank, get_pg_size
from torch import Tensor, nn

from megatron_hope.integrations.megatron_core.config import HopeTransformerConfig, UnsupportedByPlugin
from megatron_hope.model.layers import CausalDepthwiseConv1d, RMSNorm
from megatron_hope.model.titans import memory_init, memory_options
from megatron_hope.ops.memory import memory_scan, resolve_impl
from megatron_hope.ops.self_modifying import GateReadouts, self_modifying_scan


@dataclass
class MixerSubmodules:
    """The static projections; megatron-core's own parallel linears by default."""

    column_linear: ModuleSpec | type = ColumnParallelLinear
    row_linear: ModuleSpec | type = RowParallelLinear


class _TPMixerBase(MegatronModule):
    """Counterpart of the native _MixerBase for this rank's heads: in_proj + conv, out_norm, gate, out_proj."""

    def __init__(self, config: HopeTransformerConfig, submodules: MixerSubmodules, n_streams: int,
                 pg_collection=None):
        super().__init__(config)
        cfg = config.hope
        self.tp_group = (pg_collection or ProcessGroupCollection.use_mpu_process_groups(["tp"])).tp
        tp = get_pg_size(self.tp_group)
        d, self.head_dim, self.n_streams = cfg.d_model, cfg.head_dim, n_streams
        self.n_heads = cfg.n_heads // tp  # heads on this rank
        rank = get_pg_rank(self.tp_group)
        self.heads = slice(rank * self.n_heads, (rank + 1) * self.n_heads)
        self.in_proj = self._column(submodules, n_streams * d, "in_proj")
        self.conv = CausalDepthwiseConv1d(n_streams * d // tp, cfg.conv_width)
        self.out_norm = RMSNorm(self.head_dim, cfg.norm_eps)
        self.gate = self._column(submodules, d, "gate")
        # as HopeLM.init_weights: normal(init_std) inputs, the residual-branch scaled std for the output
        self.out_proj = build_module(submodules.row_linear, d, d, config=config,
                                     init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
                                     skip_bias_add=True, is_expert=False, tp_comm_buffer_name="out_proj",
                                     tp_group=self.tp_group)
        set_tensor_model_parallel_attributes(self.conv.weight, True, 0, 1)

    def _column(self, submodules: MixerSubmodules, out: int, name: str, bias: bool = False) -> nn.Module:
        d = self.config.hidden_size
        return build_module(submodules.column_linear, d, out, config=self.config,
                            init_method=self.config.init_method, gather_output=False, bias=bias,
                            skip_bias_add=False, is_expert=False, tp_comm_buffer_name=name, tp_group=self.tp_group)

    def _head_shard(self, full: Tensor) -> nn.Parameter:
        """This rank's heads of a per-head tensor (leading dim H), built whole on every rank from the same
        seed as megatron-core's CPU initialisation does."""
        p = nn.Parameter(full[self.heads].detach().clone())
        set_tensor_model_parallel_attributes(p, True, 0, 1)
        return p

    def streams(self, x: Tensor) -> list[Tensor]:
        """[s, b, d] -> per-head streams, each (b, heads, s, w)."""
        u, _ = self.in_proj(x)
        u = F.silu(self.conv(u.transpose(0, 1)))  # (b, s, heads * streams * w), head-major
        B, T, _ = u.shape
        u = u.view(B, T, self.n_heads, self.n_streams, self.head_dim).permute(3, 0, 2, 1, 4)
        return list(u.unbind(0))

    def output(self, o: Tensor, x: Tensor) -> Tensor:
        """o: (b, heads, s, w) read-outs -> out_proj(sigmoid(gate(x)) * norm(o)), [s, b, d]."""
        # the norm weight is shared by all heads and so by all TP ranks: all-reduce its gradient
        weight = copy_to_tensor_model_parallel_region(self.out_norm.weight, self.tp_group)
        o = F.rms_norm(o, (self.head_dim,), weight, self.out_norm.eps)
        o = o.permute(2, 0, 1, 3).flatten(2)  # [s, b, heads * w]
        gate, _ = self.gate(x)
        out, _ = self.out_proj(torch.sigmoid(gate) * o)
        return out

    @staticmethod
    def _refuse(inference_context, packed_seq_params) -> None:
        if inference_context is not None:
            raise UnsupportedByPlugin("megatron-core's inference context (KV-cache decoding) is not supported by "
                                      "the memory mixers; run whole sequences")
        if packed_seq_params is not None:
            raise UnsupportedByPlugin("packed_seq_params (THD packing) is not supported by the memory mixers; "
                                      "pass [s, b, h] batches")

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
                           ) -> ShardedStateDict:
        """megatron-core's default treats parameters outside its parallel layers as replicated; the per-head
        ones (and the conv's channels) are split along dim 0 across TP ranks."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        linears = {n for n, m in self.named_children() if hasattr(m, "sharded_state_dict")}
        per_head = {n: p for n, p in self.named_parameters()
                    if n.split(".")[0] not in linears and getattr(p, "tensor_model_parallel", False)}
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sharded.update(make_sharded_tensors_for_checkpoint(
            per_head, prefix, {n: 0 for n in per_head}, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"]))
        return sharded


class SelfModifyingTitansMixer(_TPMixerBase):
    """megatron-core twin of model.titans.SelfModifyingTitans (HOPE's mixer) for this rank's heads."""

    def __init__(self, config: HopeTransformerConfig, submodules: MixerSubmodules, layer_number: int,
                 pg_collection=None):
        super().__init__(config, submodules, 4, pg_collection)  # layer_number: megatron-core passes it; unused
        cfg = config.hope
        H, w = cfg.n_heads, cfg.head_dim
        m = cfg.memory.hidden_mult * w
        n_gen = 5 if cfg.memory.adaptive_q else 4
        self.opts = memory_options(cfg, self_modifying=True)
        self.gen_init = nn.ParameterDict({n: self._head_shard(t) for n, t in
                                          memory_init(cfg.memory.kind, H, n_gen, w, m).items()})
        self.mem_init = nn.ParameterDict({n: self._head_shard(t) for n, t in
                                          memory_init(cfg.memory.kind, H, 1, w, m).items()})
        self.beta_proj = self._column(submodules, H, "beta_proj", bias=True)
        with torch.no_grad():
            self.beta_proj.bias.fill_(2.0)  # momentum decay starts near 0.88
        self.eta_readout = self._head_shard(torch.randn(H, w) / math.sqrt(w))
        self.eta_bias = self._head_shard(torch.full((H,), -2.0))
        self.alpha_readout = self._head_shard(torch.randn(H, w) / math.sqrt(w))
        self.alpha_bias = self._head_shard(torch.full((H,), cfg.memory.alpha_bias_init))

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, inference_context=None,
                packed_seq_params=None, **kwargs) -> tuple[Tensor, None]:
        """[s, b, h] -> ([s, b, h], no bias); causal by construction, so attention_mask is not used."""
        self._refuse(inference_context, packed_seq_params)
        mem = self.config.hope.memory
        q_in, k_in, v_in, g_in = self.streams(hidden_states)
        gens = [k_in, v_in, g_in, g_in] + ([q_in] if mem.adaptive_q else [])
        readouts = GateReadouts(self.eta_readout, self.eta_bias, self.alpha_readout, self.alpha_bias, mem.eta_max)
        beta, _ = self.beta_proj(hidden_states)
        log_beta = F.logsigmoid(beta).permute(1, 2, 0)  # (b, heads, s)
        o, _ = self_modifying_scan(torch.stack(gens, dim=2), None if mem.adaptive_q else q_in, log_beta,
                                   dict(self.gen_init), dict(self.mem_init), readouts, None, mem.chunk_size,
                                   self.opts, impl=resolve_impl(mem.impl, self.opts, hidden_states.device))
        return self.output(o, hidden_states), None


class TitansMixer(_TPMixerBase):
    """megatron-core twin of model.titans.TitansMixer (the Titans baseline) for this rank's heads. Its
    eta/alpha/beta projection is head-major [head, (eta, alpha, beta)] (native: [(eta, alpha, beta), head])."""

    def __init__(self, config: HopeTransformerConfig, submodules: MixerSubmodules, layer_number: int,
                 pg_collection=None):
        super().__init__(config, submodules, 3, pg_collection)
        cfg = config.hope
        H, w = cfg.n_heads, cfg.head_dim
        self.opts = memory_options(cfg, self_modifying=False)
        self.mem_init = nn.ParameterDict({n: self._head_shard(t) for n, t in
                                          memory_init(cfg.memory.kind, H, 1, w, cfg.memory.hidden_mult * w).items()})
        self.gate_proj = self._column(submodules, 3 * H, "gate_proj", bias=True)
        with torch.no_grad():
            self.gate_proj.bias.copy_(torch.tensor([-2.0, cfg.memory.alpha_bias_init, 2.0]).repeat(self.n_heads))

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, inference_context=None,
                packed_seq_params=None, **kwargs) -> tuple[Tensor, None]:
        """[s, b, h] -> ([s, b, h], no bias); causal by construction, so attention_mask is not used."""
        self._refuse(inference_context, packed_seq_params)
        mem = self.config.hope.memory
        q, k, v = self.streams(hidden_states)
        gates, _ = self.gate_proj(hidden_states)  # [s, b, heads * 3]
        T, B, _ = gates.shape
        eta_pre, alpha_pre, beta_pre = gates.view(T, B, self.n_heads, 3).permute(3, 1, 2, 0).unbind(0)
        init = {n: t[:, 0] for n, t in self.mem_init.items()}
        o, _ = memory_scan(init, F.normalize(k, dim=-1), v, F.normalize(q, dim=-1),
                           mem.eta_max * torch.sigmoid(eta_pre), F.logsigmoid(alpha_pre), F.logsigmoid(beta_pre),
                           None, mem.chunk_size, self.opts, impl=resolve_impl(mem.impl, self.opts, k.device))
        return self.output(o, hidden_states), None
