"""The self-modifying Titans inner loop (hope_spec.md 1.2-1.3, arXiv Eq. 83-93), per head.

Per chunk, from the chunk-start states (or the inits after a document start):
  generator memories produce  k_t = M_k(x^k_t), v_t = M_v(x^v_t), eta_t, alpha_t from M_eta(x^g_t), M_alpha(x^g_t)
  (and q_t = M_q(x^q_t) when q is adaptive); every memory then regresses its own image of v_t,
  ||M(k_t) - M_c(v_t)||^2, with DGD, retention alpha_t and learning rate eta_t; the main memory M_mem is read
  at q_t with the in-chunk dual form. The generators are read at the chunk-start state (reading A), which is
  what makes the chunk parallel: nothing inside a chunk waits for another token of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_hope.ops.chunk_algebra import ChunkGates
from megatron_hope.ops.memory import (MemoryOptions, State, apply_memory, chunk_update_chunked,
                                      chunk_update_sequential, initial_state, state_dtype)

@dataclass
class GateReadouts:
    """Fixed linear readouts turning the eta/alpha memories' w-dim outputs into one scalar per head (spec 1.2)."""

    eta_weight: Tensor  # (H, w)
    eta_bias: Tensor  # (H,)
    alpha_weight: Tensor  # (H, w)
    alpha_bias: Tensor  # (H,)
    eta_max: float


def _read_at_chunk_start(state: State, init: State, x: Tensor, reset: Tensor | None, opts: MemoryOptions) -> Tensor:
    """Generator outputs at the chunk-start state, or at the init for tokens after a document start."""
    out = apply_memory(state, x, opts)
    if reset is None:
        return out
    after_start = torch.cumsum(reset.long(), -1) > 0
    return torch.where(after_start[..., None, :, None], apply_memory(init, x, opts), out)


def self_modifying_scan(gen_inputs: Tensor, q: Tensor | None, log_beta: Tensor | None, gen_init: State,
                        mem_init: State, readouts: GateReadouts, doc_start: Tensor | None, chunk_size: int,
                        opts: MemoryOptions, state: State | None = None, impl: str = "chunked"
                        ) -> tuple[Tensor, State]:
    """Run the self-modifying memories over a sequence.

    gen_inputs: (B, H, G, T, w), the static projections feeding the generators in the order k, v, eta, alpha
    (then q when q is adaptive, in which case `q` is None); q: (B, H, T, w) static queries (L2-normalised
    here); log_beta: (B, H, T) momentum decay; gen_init / mem_init: init states with leading dims (H, G) and
    (H, 1); doc_start: (B, T) bool. Returns the main memory's read-outs (B, H, T, w) and the final state,
    whose memory dim (at -3) holds the G generators, then the main memory. The inner loop runs in fp32, also
    under autocast (hope_spec.md 2.8: states and scans in fp32).
    """
    with torch.autocast(gen_inputs.device.type, enabled=False):
        return _scan(gen_inputs, q, log_beta, gen_init, mem_init, readouts, doc_start, chunk_size, opts, state, impl)


def _scan(gen_inputs: Tensor, q: Tensor | None, log_beta: Tensor | None, gen_init: State, mem_init: State,
          readouts: GateReadouts, doc_start: Tensor | None, chunk_size: int, opts: MemoryOptions,
          state: State | None, impl: str) -> tuple[Tensor, State]:
    dtype, sd = gen_inputs.dtype, state_dtype(gen_inputs.dtype)
    gen_inputs = gen_inputs.to(sd)
    B, H, G, T, _ = gen_inputs.shape
    # one stack of G generators + the main memory (last): every memory is updated in the same ops
    init = {n: torch.cat([gen_init[n], mem_init[n]], dim=1).to(sd) for n in gen_init}
    if state is None:
        state = initial_state(init, torch.Size((B, H, G + 1)), opts)
    step = chunk_update_chunked if impl == "chunked" else chunk_update_sequential
    resets = doc_start[:, None, :].expand(B, H, T) if doc_start is not None else None
    outs = []
    for s in range(0, T, chunk_size):
        sl = slice(s, min(s + chunk_size, T))
        reset = resets[..., sl] if resets is not None else None
        gen_state = {n: t[:, :, :G] for n, t in state.items() if n in init}
        gen = _read_at_chunk_start(gen_state, {n: t[:, :G] for n, t in init.items()}, gen_inputs[..., sl, :],
                                   reset, opts)  # (B, H, G, L, w)
        k = F.normalize(gen[:, :, 0], dim=-1)
        v = gen[:, :, 1]
        eta = readouts.eta_max * torch.sigmoid(
            torch.einsum("bhlw,hw->bhl", gen[:, :, 2], readouts.eta_weight.to(sd)) + readouts.eta_bias.to(sd)[:, None])
        log_alpha = F.logsigmoid(
            torch.einsum("bhlw,hw->bhl", gen[:, :, 3], readouts.alpha_weight.to(sd)) + readouts.alpha_bias.to(sd)[:, None])
        q_chunk = F.normalize(gen[:, :, 4] if q is None else q[..., sl, :].to(sd), dim=-1)
        gates = ChunkGates(eta[:, :, None], log_alpha[:, :, None],
                           log_beta[..., sl].to(sd)[:, :, None] if opts.momentum else None,
                           reset[:, :, None] if reset is not None else None, opts.momentum_form)
        # keys and values are shared by every memory of the head; only the main memory is read
        state, out = step(state, init, gates, k[:, :, None], v[:, :, None], q_chunk[:, :, None], opts, read_memory=-1)
        outs.append(out[:, :, 0])
    return torch.cat(outs, dim=-2).to(dtype), state
