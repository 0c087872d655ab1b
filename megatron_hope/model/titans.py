"""Token mixers built on neural memories: the self-modifying Titans mixer of HOPE and the Titans baseline.

Both take (B, T, d) and return (B, T, d) plus their carried state (MixerState), which a later call (the next
sequence shard, the next CMS chunk, the next chunk when streaming) continues from: the calls then compute what
one call over the whole sequence would. A call that continues a state must start on every row's chunk grid, which
restarts at each document start: the row's current document has a multiple of model.memory.chunk_size tokens in
the earlier calls, or a document starts the call in that row. They hold no pre-norm and no residual.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_hope.config import ModelConfig
from megatron_hope.model.layers import CausalDepthwiseConv1d, RMSNorm, local, local_dict
from megatron_hope.ops import flops
from megatron_hope.ops.memory import MemoryOptions, State, memory_scan, resolve_impl
from megatron_hope.ops.self_modifying import GateReadouts, self_modifying_scan


class MixerState(NamedTuple):
    """What a mixer carries from one call to the next: a pytree of tensors (a dict of memory matrices and one
    tensor), which can be detached, moved or sent to the rank holding the next sequence shard as it is."""

    memory: State  # the memories' weights and momenta after the last token (ops.memory), fp32
    conv: Tensor  # (B, conv_width - 1, channels): the conv's last inputs (CausalDepthwiseConv1d.next_tail)


def memory_options(cfg: ModelConfig, self_modifying: bool) -> MemoryOptions:
    m = cfg.memory
    if not self_modifying:  # Titans: plain GD with momentum and decay, targets v_t (Titans section 3)
        return MemoryOptions(kind=m.kind, momentum=m.momentum, momentum_form="titans", readout=m.readout,
                             dgd="none", self_target=False, activation=m.activation,
                             differentiable=m.differentiable_writes, grad_clip=m.grad_clip,
                             recompute_chunks=m.recompute_chunks, write_backward=m.write_backward)
    return MemoryOptions(kind=m.kind, momentum=m.momentum, momentum_form=m.momentum_form, readout=m.readout,
                         dgd="first" if m.kind == "linear" else m.dgd, self_target=True, activation=m.activation,
                         differentiable=m.differentiable_writes, grad_clip=m.grad_clip,
                         recompute_chunks=m.recompute_chunks, write_backward=m.write_backward)


def memory_init(kind: str, n_heads: int, n_mem: int, w: int, m: int) -> nn.ParameterDict:
    """Meta-learned initial states M_0, one per head and memory (values set by `reset_memory_init`)."""
    shapes = {"W": (w, w)} if kind == "linear" else {"A": (w, m), "B": (m, w)}
    params = nn.ParameterDict({n: nn.Parameter(torch.empty(n_heads, n_mem, *shape)) for n, shape in shapes.items()})
    reset_memory_init(params)
    return params


@torch.no_grad()
def reset_memory_init(params: nn.ParameterDict) -> None:
    """The MLP memory z + A s(B z) starts near the identity map; the linear memory starts at the identity."""
    if "W" in params:
        w = params["W"].shape[-1]
        params["W"].copy_(torch.eye(w, device=params["W"].device).expand_as(params["W"]))
        return
    w, m = params["A"].shape[-2:]
    params["A"].normal_(0.0, 0.5 / math.sqrt(m))
    params["B"].normal_(0.0, 1.0 / math.sqrt(w))


class _MixerBase(nn.Module):
    """Shared projections: input projection + short causal conv, per-head output norm, gate, output projection."""

    def __init__(self, cfg: ModelConfig, n_streams: int):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.n_streams = n_streams
        self.in_proj = nn.Linear(d, n_streams * d, bias=False)
        self.conv = CausalDepthwiseConv1d(n_streams * d, cfg.conv_width)
        self.out_norm = RMSNorm(self.head_dim, cfg.norm_eps)
        self.gate = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)

    def streams(self, x: Tensor, doc_start: Tensor | None, conv_tail: Tensor | None) -> tuple[list[Tensor], Tensor]:
        """Project, convolve (continuing from `conv_tail`) and split into per-head streams, each (B, H, T, w);
        also the conv's tail for the next call. The projection's rows are head-major ([head, stream, w]), so a
        contiguous slice of them holds whole heads (tensor parallelism)."""
        B, T, _ = x.shape
        p = self.in_proj(x)
        u = F.silu(self.conv(p, doc_start, conv_tail))
        u = u.view(B, T, -1, self.n_streams, self.head_dim).permute(3, 0, 2, 1, 4)
        return list(u.unbind(0)), self.conv.next_tail(p, doc_start, conv_tail)

    def output(self, o: Tensor, x: Tensor) -> Tensor:
        """o: (B, H, T, w) memory read-outs -> out_proj(sigmoid(gate(x)) * norm(o))."""
        B, H, T, w = o.shape
        o = self.out_norm(o).transpose(1, 2).reshape(B, T, H * w)  # H: this rank's heads under TP
        return self.out_proj(torch.sigmoid(self.gate(x)) * o)


class SelfModifyingTitans(_MixerBase):
    """HOPE's mixer: generator memories M_k, M_v, M_eta, M_alpha (and M_q when adaptive) and the main memory,
    all per head, all trained in-context on their own self-generated targets (hope_spec.md 1.2)."""

    def __init__(self, cfg: ModelConfig):
        n_gen = 5 if cfg.memory.adaptive_q else 4
        super().__init__(cfg, n_streams=4)  # q (or M_q's input), k-input, v-input, eta/alpha-input
        H, w = cfg.n_heads, cfg.head_dim
        m = cfg.memory.hidden_mult * w
        self.n_gen = n_gen
        self.opts = memory_options(cfg, self_modifying=True)
        self.gen_init = memory_init(cfg.memory.kind, H, n_gen, w, m)
        self.mem_init = memory_init(cfg.memory.kind, H, 1, w, m)
        self.beta_proj = nn.Linear(cfg.d_model, H) if cfg.memory.momentum else None
        self.eta_readout = nn.Parameter(torch.empty(H, w))
        self.eta_bias = nn.Parameter(torch.empty(H))
        self.alpha_readout = nn.Parameter(torch.empty(H, w))
        self.alpha_bias = nn.Parameter(torch.empty(H))
        self.reset_memory_parameters()

    @torch.no_grad()
    def reset_memory_parameters(self) -> None:
        """Memory inits, gate readouts and biases (the linear weights are the LM's init_weights' job)."""
        reset_memory_init(self.gen_init)
        reset_memory_init(self.mem_init)
        if self.beta_proj is not None:
            self.beta_proj.bias.fill_(2.0)  # momentum decay starts near 0.88
        w = self.head_dim
        self.eta_readout.normal_(0.0, 1.0 / math.sqrt(w))
        self.eta_bias.fill_(-2.0)
        self.alpha_readout.normal_(0.0, 1.0 / math.sqrt(w))
        self.alpha_bias.fill_(self.cfg.memory.alpha_bias_init)

    def forward(self, x: Tensor, doc_start: Tensor | None = None, state: MixerState | None = None
                ) -> tuple[Tensor, MixerState]:
        (q_in, k_in, v_in, g_in), conv = self.streams(x, doc_start, None if state is None else state.conv)
        gens = [k_in, v_in, g_in, g_in] + ([q_in] if self.cfg.memory.adaptive_q else [])
        readouts = GateReadouts(local(self.eta_readout), local(self.eta_bias), local(self.alpha_readout),
                                local(self.alpha_bias), self.cfg.memory.eta_max)
        log_beta = F.logsigmoid(self.beta_proj(x)).transpose(1, 2) if self.beta_proj is not None else None
        o, memory = self_modifying_scan(
            torch.stack(gens, dim=2), None if self.cfg.memory.adaptive_q else q_in, log_beta,
            local_dict(self.gen_init), local_dict(self.mem_init), readouts, doc_start, self.cfg.memory.chunk_size, self.opts,
            state=None if state is None else state.memory,
            impl=resolve_impl(self.cfg.memory.impl, self.opts, x.device))
        return self.output(o, x), MixerState(memory, conv)


class TitansMixer(_MixerBase):
    """Titans baseline (Behrouz et al., arXiv 2501.00663): static q/k/v projections, one memory per head
    trained with momentum and decay on targets v_t, gradients at the chunk start."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, n_streams=3)
        H, w = cfg.n_heads, cfg.head_dim
        self.opts = memory_options(cfg, self_modifying=False)
        self.mem_init = memory_init(cfg.memory.kind, H, 1, w, cfg.memory.hidden_mult * w)
        self.n_gates = 3 if cfg.memory.momentum else 2
        self.gate_proj = nn.Linear(cfg.d_model, self.n_gates * H)  # eta, alpha (and beta) per head
        self.reset_memory_parameters()

    @torch.no_grad()
    def reset_memory_parameters(self) -> None:
        reset_memory_init(self.mem_init)
        bias = torch.tensor([-2.0, self.cfg.memory.alpha_bias_init, 2.0][:self.n_gates])
        self.gate_proj.bias.copy_(bias.repeat(self.n_heads))

    def forward(self, x: Tensor, doc_start: Tensor | None = None, state: MixerState | None = None
                ) -> tuple[Tensor, MixerState]:
        (q, k, v), conv = self.streams(x, doc_start, None if state is None else state.conv)
        # rows head-major ([head, gate]); (B, H, T) each
        gates = self.gate_proj(x).unflatten(-1, (-1, self.n_gates)).permute(3, 0, 2, 1).unbind(0)
        eta_pre, alpha_pre = gates[:2]
        log_beta = F.logsigmoid(gates[2]) if len(gates) == 3 else None
        init = {n: t[:, 0] for n, t in local_dict(self.mem_init).items()}
        o, memory = memory_scan(
            init, F.normalize(k, dim=-1), v, F.normalize(q, dim=-1), self.cfg.memory.eta_max * torch.sigmoid(eta_pre),
            F.logsigmoid(alpha_pre), log_beta, doc_start[:, None].expand_as(eta_pre)
            if doc_start is not None else None, self.cfg.memory.chunk_size, self.opts,
            state=None if state is None else state.memory,
            impl=resolve_impl(self.cfg.memory.impl, self.opts, x.device))
        return self.output(o, x), MixerState(memory, conv)


def mixer_forward_flops(cfg: ModelConfig, seq_len: int, self_modifying: bool) -> float:
    """Forward matmul FLOPs per token of one mixer: projections plus the inner loop (ops/flops.py)."""
    d, H, w = cfg.d_model, cfg.n_heads, cfg.head_dim
    m = cfg.memory.hidden_mult * w
    L = min(cfg.memory.chunk_size, seq_len)
    opts = memory_options(cfg, self_modifying)
    if self_modifying:
        n_gen = 5 if cfg.memory.adaptive_q else 4
        proj = 2 * d * 4 * d + (2 * d * H if cfg.memory.momentum else 0) + 2 * 2 * d * d  # in, beta, gate, out
        return proj + H * flops.self_modifying_flops(opts, w, m, L, n_gen)
    n_gates = 3 if cfg.memory.momentum else 2
    proj = 2 * d * 3 * d + 2 * d * n_gates * H + 2 * 2 * d * d  # in_proj, gate_proj, gate, out_proj
    return proj + H * flops.titans_flops(opts, w, m, L)
