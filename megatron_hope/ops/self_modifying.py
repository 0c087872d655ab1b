"""The self-modifying Titans inner loop (hope_spec.md 1.2-1.3, arXiv Eq. 83-93), per head.

Per chunk (on the per-document grid of ops/packing.py), from the chunk-start states:
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

from megatron_hope.ops.chunk_algebra import ChunkCoefficients, ChunkGates
from megatron_hope.ops.memory import (MemoryOptions, State, apply_memory, chunk_update, initial_state,
                                      keep_finished_rows, restart_documents, scan_chunks, sequential_scan,
                                      state_dtype)
from megatron_hope.ops.packing import DocumentLayout


@dataclass
class GateReadouts:
    """Fixed linear readouts turning the eta/alpha memories' w-dim outputs into one scalar per head (spec 1.2)."""

    eta_weight: Tensor  # (H, w)
    eta_bias: Tensor  # (H,)
    alpha_weight: Tensor  # (H, w)
    alpha_bias: Tensor  # (H,)
    eta_max: float


def _generated(gen: Tensor, q: Tensor | None, readouts: GateReadouts) -> tuple[Tensor, ...]:
    """Keys, values, learning rates, log-retentions and queries from the generators' outputs gen (B, H, G, L, w)
    (q: static queries (B, H, L, w), or None to take M_q's output)."""
    sd = gen.dtype
    gen_k, v, gen_eta, gen_alpha, *gen_q = gen.unbind(2)
    eta = readouts.eta_max * torch.sigmoid(
        (gen_eta * readouts.eta_weight.to(sd)[:, None]).sum(-1) + readouts.eta_bias.to(sd)[:, None])
    log_alpha = F.logsigmoid(
        (gen_alpha * readouts.alpha_weight.to(sd)[:, None]).sum(-1) + readouts.alpha_bias.to(sd)[:, None])
    return F.normalize(gen_k, dim=-1), v, eta, log_alpha, F.normalize(gen_q[0] if q is None else q, dim=-1)


def self_modifying_scan(gen_inputs: Tensor, q: Tensor | None, log_beta: Tensor | None, gen_init: State,
                        mem_init: State, readouts: GateReadouts, doc_start: Tensor | None, chunk_size: int,
                        opts: MemoryOptions, state: State | None = None, impl: str = "torch"
                        ) -> tuple[Tensor, State]:
    """Run the self-modifying memories over a sequence.

    gen_inputs: (B, H, G, T, w), the static projections feeding the generators in the order k, v, eta, alpha
    (then q when q is adaptive, in which case `q` is None); q: (B, H, T, w) static queries (L2-normalised
    here); log_beta: (B, H, T) momentum decay; gen_init / mem_init: init states with leading dims (H, G) and
    (H, 1); doc_start: (B, T) bool. impl: "torch" (chunk-parallel), "triton" (each chunk's generator reads, with
    MLP memories, and its writes and reads on the kernels of ops/triton/) or "sequential" (the oracle). Returns the
    main memory's read-outs (B, H, T, w) and the final state, whose memory dim (at -3) holds the G generators,
    then the main memory. The inner loop runs in fp32, also under autocast (hope_spec.md 2.8).
    """
    with torch.autocast(gen_inputs.device.type, enabled=False):
        dtype, sd = gen_inputs.dtype, state_dtype(gen_inputs.dtype)
        gen_inputs, q = gen_inputs.to(sd), q.to(sd) if q is not None else None
        log_beta = log_beta.to(sd) if log_beta is not None else None
        B, H, G, T, _ = gen_inputs.shape
        # one stack of G generators + the main memory (last): every memory is updated in the same ops
        init = {n: torch.cat([gen_init[n], mem_init[n]], dim=1).to(sd) for n in gen_init}
        if state is None:
            state = initial_state(init, torch.Size((B, H, G + 1)), opts)
        args = (gen_inputs, q, log_beta, init, readouts, doc_start, chunk_size, opts, state)
        if impl == "sequential":
            out, state = _scan_sequential(*args)
        elif impl in ("torch", "triton"):
            out, state = _scan_chunked(*args, kernels=impl == "triton")
        else:
            raise ValueError(f"memory impl {impl!r}: expected 'torch', 'triton' or 'sequential'")
        return out.to(dtype), state


def _scan_sequential(gen_inputs: Tensor, q: Tensor | None, log_beta: Tensor | None, init: State,
                     readouts: GateReadouts, doc_start: Tensor | None, chunk_size: int, opts: MemoryOptions,
                     state: State) -> tuple[Tensor, State]:
    G = gen_inputs.shape[2]

    def inputs(P: State, t: int):
        gen = apply_memory({n: w[:, :, :G] for n, w in P.items()}, gen_inputs[..., t:t + 1, :], opts)
        k, v, eta, log_alpha, q_t = _generated(gen, None if q is None else q[..., t:t + 1, :], readouts)
        # keys, values and gates are shared by every memory of the head (memory dim 1 at -2 / -1)
        return (k[:, :, None, 0], v[:, :, None, 0], q_t[:, :, None, 0], eta[:, :, None, 0], log_alpha[:, :, None, 0],
                log_beta[:, :, None, t] if opts.momentum else None)

    out, state = sequential_scan(init, state, inputs, None if doc_start is None else doc_start[:, None, None],
                                 gen_inputs.shape[-2], chunk_size, opts, read_memory=-1)
    return out[:, :, 0], state


def _scan_chunked(gen_inputs: Tensor, q: Tensor | None, log_beta: Tensor | None, init: State,
                  readouts: GateReadouts, doc_start: Tensor | None, chunk_size: int, opts: MemoryOptions,
                  state: State, kernels: bool = False) -> tuple[Tensor, State]:
    """kernels: each chunk's writes and reads on the Triton kernels instead of the dual form in PyTorch, and with
    MLP memories the generator reads too (two launches each way per chunk)."""
    G = gen_inputs.shape[2]
    layout = DocumentLayout.build(doc_start, chunk_size) if doc_start is not None else None
    if layout is not None:
        gen_inputs = layout.scatter(gen_inputs, -2)
        q = layout.scatter(q, -2) if q is not None else None
        log_beta = layout.scatter(log_beta, -1) if log_beta is not None else None
        doc_start = layout.doc_start
    generator_reads = chunk_on_kernels = None  # bound either way: compiled code reads no unset closure cell
    if kernels:
        from megatron_hope.ops.triton.generators import generator_reads  # triton is an optional import
        from megatron_hope.ops.triton.scan import chunk_on_kernels
        sd = gen_inputs.dtype
        readouts = GateReadouts(readouts.eta_weight.to(sd), readouts.eta_bias.to(sd), readouts.alpha_weight.to(sd),
                                readouts.alpha_bias.to(sd), readouts.eta_max)

    def step(state: State, s: int) -> tuple[State, Tensor]:
        sl = slice(s, s + chunk_size)
        if doc_start is not None:
            state = restart_documents(state, init, doc_start[:, s, None, None])
        x = gen_inputs[..., sl, :]
        q_static = q[..., sl, :] if q is not None else None
        # the generators are read at the chunk-start state (reading A): nothing in a chunk waits for its tokens
        if kernels and opts.kind == "mlp":
            k, v, eta, log_alpha, q_chunk = generator_reads(state, x, q_static, readouts, opts.activation)
        else:
            gen = apply_memory({n: w[:, :, :G] for n, w in state.items() if n in init}, x, opts)
            k, v, eta, log_alpha, q_chunk = _generated(gen, q_static, readouts)
        if kernels:  # the memories of a head share the keys and gates; pads are not written; the main memory is read
            out, new = chunk_on_kernels(state, k, v, q_chunk, eta, log_alpha,
                                        log_beta[..., sl] if opts.momentum else None,
                                        layout.keep[:, None, sl] if layout is not None else None, opts)
            return new, out[:, :, -1]
        last = None
        if layout is not None:  # pads: zero generator inputs give zero keys; learning rate 0 and unit decays here
            real = layout.keep[:, None, sl]
            eta, log_alpha = eta * real, log_alpha * real
            last = layout.last_in_chunk(s, x.shape[-2])[:, None, None].expand(x.shape[0], x.shape[1], 1)
        coef = ChunkCoefficients.build(ChunkGates(eta[:, :, None], log_alpha[:, :, None],
                                                  log_beta[:, :, None, sl] if opts.momentum else None,
                                                  opts.momentum_form))
        # keys and values are shared by every memory of the head; only the main memory is read
        new, out = chunk_update(state, coef, k[:, :, None], v[:, :, None], q_chunk[:, :, None], opts, read_memory=-1,
                                last=last)
        return (new if layout is None else keep_finished_rows(layout.row_active(s), new, state)), out[:, :, 0]

    state, out = scan_chunks(step, state, range(0, gen_inputs.shape[-2], chunk_size), opts)
    return (layout.gather(out, -2) if layout is not None else out), state
