"""memory_scan on the Triton kernels (impl "triton"): lays the rows out for the kernels and runs the linear or the
MLP memory's kernel pair (linear_memory.py, mlp_memory.py) as one autograd op.

The layout is the chunk-parallel form's (ops/packing.py): every document moved to start at a multiple of the
chunk, so a kernel program finds a chunk start every C tokens and a document start only there; pads and the
ragged last chunk's padding are marked not `real` and change nothing. Leading dims (batch, heads, memories) are
flattened into one row per kernel program.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_hope.ops.memory import MemoryOptions, State, matrix_names
from megatron_hope.ops.packing import DocumentLayout
from megatron_hope.ops.triton import unsupported
from megatron_hope.ops.triton.linear_memory import LinearMemoryScan
from megatron_hope.ops.triton.mlp_memory import MLPMemoryScan
from megatron_hope.ops.triton.token_math import GELU, SILU

_MOMENTUM = {None: 0, "hope": 1, "titans": 2}
_READOUT = {"after_write": 0, "before_write": 1, "chunk_start": 2}


def _constants(opts: MemoryOptions, chunk_size: int) -> dict:
    """The kernels' compile-time switches for these options."""
    shared = dict(CHUNK=chunk_size, MOMENTUM=_MOMENTUM[opts.momentum_form if opts.momentum else None],
                  SELF_TARGET=opts.self_target, READOUT=_READOUT[opts.readout], CLIP=opts.grad_clip > 0)
    if opts.kind == "linear":
        return dict(shared, DGD=opts.dgd != "none")
    return dict(shared, DGD_A=opts.dgd == "each", DGD_B=opts.dgd != "none",
                ACT=SILU if opts.activation == "silu" else GELU)


def kernel_memory_scan(init: State, k: Tensor, v: Tensor, q: Tensor | None, eta: Tensor, log_alpha: Tensor,
                       log_beta: Tensor | None, doc_start: Tensor | None, chunk_size: int, opts: MemoryOptions,
                       state: State) -> tuple[Tensor | None, State]:
    """The memory's scan on the kernels, called by ops.memory.memory_scan (impl "triton") with its arguments in
    the state dtype and the carried state built: the torch form's results and gradients.

    k, v, q: (..., T, w); eta, log_alpha, log_beta, doc_start: (..., T); init and state: the memory's matrices
    ({"W"} or {"A", "B"}, and momenta "S_<name>" in state) broadcasting to (..., rows, cols). Returns the read-outs
    (..., T, w) (None without q) and the final state.
    """
    lead, T = k.shape[:-2], k.shape[-2]
    streams = [k, v, q if q is not None else torch.zeros_like(k)]
    gates = [eta, log_alpha, log_beta if log_beta is not None else torch.zeros_like(eta)]
    layout = DocumentLayout.build(doc_start.expand(*lead, T), chunk_size, rounded=False) \
        if doc_start is not None else None
    if layout is not None:
        streams = [layout.scatter(x, -2) for x in streams]
        gates = [layout.scatter(g, -1) for g in gates]
        real, starts = layout.keep, layout.doc_start
    else:
        real = torch.ones(*lead, T, dtype=torch.bool, device=k.device)
        starts = doc_start.expand(*lead, T) if doc_start is not None else None
    Tl = streams[0].shape[-2]
    pad = -Tl % chunk_size  # the ragged last chunk, padded to a whole one
    streams = [F.pad(x, (0, 0, 0, pad)) for x in streams]
    gates = [F.pad(g, (0, pad)) for g in gates]
    real = F.pad(real.to(torch.int8), (0, pad))
    if doc_start is None:  # no document starts: the carried state (built from the init) is all the init there is
        o, new = run_kernels(streams, gates, real, None, None, state, chunk_size, opts)
    else:
        reset = F.pad(starts.to(torch.int8), (0, pad))[..., ::chunk_size]
        o, new = run_kernels(streams, gates, real, reset, init, state, chunk_size, opts)
    if q is None:
        return None, new
    o = o[..., :Tl, :]
    return (layout.gather(o, -2) if layout is not None else o), new


def chunk_on_kernels(state: State, k: Tensor, v: Tensor, q: Tensor, eta: Tensor, log_alpha: Tensor,
                     log_beta: Tensor | None, real: Tensor | None, opts: MemoryOptions) -> tuple[Tensor, State]:
    """One chunk of writes and reads (no document start inside it) from `state` on the kernels: the read-outs of
    every memory and the new state. The state's last leading dim is a stack of memories that share the keys,
    values, queries (..., L, w) and gates (..., L) given without that dim; real (..., L) bool: False at pads."""
    L = k.shape[-2]
    gates = [eta, log_alpha, log_beta if log_beta is not None else torch.zeros_like(eta)]
    real = (real if real is not None else torch.ones_like(eta, dtype=torch.bool)).expand_as(eta).to(torch.int8)
    return run_kernels([k, v, q], gates, real, None, None, state, L, opts)  # the caller restarts documents


def run_kernels(streams: list[Tensor], gates: list[Tensor], real: Tensor, reset: Tensor | None,
                init: State | None, state: State, chunk_size: int, opts: MemoryOptions) -> tuple[Tensor, State]:
    """The kernel pair on laid-out rows: streams k, v, q (..., T', w), gates and real (..., T') with T' a multiple
    of the chunk, their leading dims the state's, or the state's but the last (a stack of memories sharing them);
    reset (state's leading dims, T'/chunk) int8 and the init, or both None when no document starts. Returns the
    read-outs (state's leading dims, T', w) and the new state."""
    reason = unsupported(opts)
    if reason is not None:
        raise ValueError(f"the Triton memory kernels do not support {reason}; use model.memory.impl = 'torch'")
    if streams[0].device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton kernels run on CUDA tensors (these are on {streams[0].device.type}; tests run "
                         "them under Triton's interpreter, TRITON_INTERPRET=1): use model.memory.impl = 'auto'")
    names = matrix_names(opts)
    lead = state[names[0]].shape[:-2]
    T, w = streams[0].shape[-2:]
    rep = lead[-1] if streams[0].dim() - 2 < len(lead) else 1  # state rows per input row

    def rows(x: Tensor) -> Tensor:
        return x.expand(*lead, *x.shape[-2:]).reshape(-1, *x.shape[-2:]).contiguous()

    carried = [rows(state[n]) for n in names]
    momenta = [rows(state["S_" + n]) if opts.momentum else torch.zeros_like(c) for n, c in zip(names, carried)]
    inits = [rows(init[n]) for n in names] if init is not None else [None] * len(names)
    fn = LinearMemoryScan if opts.kind == "linear" else MLPMemoryScan
    o, *final = fn.apply(*(x.reshape(-1, T, w).contiguous() for x in streams),
                         *(g.reshape(-1, T).contiguous() for g in gates), *inits, *carried, *momenta,
                         real.reshape(-1, T).contiguous(),
                         reset.reshape(-1, T // chunk_size).contiguous() if reset is not None else None,
                         float(opts.grad_clip), rep, _constants(opts, chunk_size))
    new = {n: x.view(*lead, *x.shape[-2:]) for n, x in zip(names, final)}
    if opts.momentum:
        new.update({"S_" + n: x.view(*lead, *x.shape[-2:]) for n, x in zip(names, final[len(names):])})
    return o.view(*lead, T, w), {n: new[n] for n in state}  # the state's key order
