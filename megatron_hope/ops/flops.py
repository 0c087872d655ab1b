"""Forward matmul FLOPs per token of the memory ops, mirroring the chunked implementation term by term
(2 FLOPs per multiply-add, as torch.utils.flop_counter counts them; element-wise work and the triangular
solve, O(L^2 d) per chunk, are not counted). Units: per token and per head. The spec's estimate is
hope_spec.md 2.5; this is the exact count of what ops/memory.py runs on a sequence without document starts.
"""
from __future__ import annotations

from megatron_hope.ops.memory import MemoryOptions


def coefficient_flops(L: int, opts: MemoryOptions) -> float:
    """Chunk coefficients (shared by all memories updated with the same gates): two (L x L) @ (L x L)
    products and two matrix-vector products per chunk when momentum is on."""
    return (4 * L * L + 4 * L) if opts.momentum else 0.0


def _matrix_dims(opts: MemoryOptions, w: int, m: int) -> list[tuple[int, int, bool, bool]]:
    """(d_out, d_in, dgd, key shared by all memories) of each matrix of one memory."""
    if opts.kind == "linear":
        return [(w, w, opts.dgd != "none", True)]
    return [(w, m, opts.dgd == "each", False), (m, w, opts.dgd != "none", True)]  # A (key h), B (key k)


def apply_flops(opts: MemoryOptions, w: int, m: int) -> float:
    """M(z) for one token with fixed weights."""
    return sum(2 * o * i for o, i, *_ in _matrix_dims(opts, w, m))


def update_flops(opts: MemoryOptions, w: int, m: int, L: int, n_mem: int) -> float:
    """Errors, DGD solves and state advance of `n_mem` memories that share keys and gates (per token)."""
    errors = apply_flops(opts, w, m) * (2 if opts.self_target else 1)  # prediction (+ self-generated target)
    if opts.kind == "mlp":
        errors += 2 * w * m  # backprop of the error through A
    per_mem = errors
    shared = 0.0
    for o, i, dgd, shared_key in _matrix_dims(opts, w, m):
        if dgd:
            if shared_key:
                shared += 2 * L * i  # K K^T, once for all memories
            else:
                per_mem += 2 * L * i
            per_mem += 2 * L * o + (2 * o * i if opts.momentum else 0)  # right-hand side (W_c k: from the errors)
            per_mem += 2 * o * i  # the x terms of the final state
        per_mem += 2 * o * i + (2 * o * i if opts.momentum else 0)  # final state and momentum
    return n_mem * per_mem + shared


def read_flops(opts: MemoryOptions, w: int, m: int, L: int) -> float:
    """Dual-form read-out of one memory at one query per token."""
    if opts.readout == "chunk_start":
        return apply_flops(opts, w, m)
    total = 0.0
    for o, i, dgd, _ in _matrix_dims(opts, w, m):
        total += 2 * o * i + 2 * L * i + 2 * L * o  # init term, query-key products, error sum
        total += 2 * o * i if opts.momentum else 0
        total += 2 * L * o if dgd else 0
    return total


def self_modifying_flops(opts: MemoryOptions, w: int, m: int, L: int, n_gen: int) -> float:
    """Inner loop of the self-modifying Titans mixer, per token and head."""
    gen_reads = n_gen * apply_flops(opts, w, m)  # generator outputs (the eta/alpha readouts are element-wise)
    # the generators and the main memory are updated as one stack; only the main memory is read
    return (gen_reads + coefficient_flops(L, opts) + update_flops(opts, w, m, L, n_gen + 1)
            + read_flops(opts, w, m, L))


def titans_flops(opts: MemoryOptions, w: int, m: int, L: int) -> float:
    """Inner loop of the Titans baseline mixer, per token and head."""
    return coefficient_flops(L, opts) + update_flops(opts, w, m, L, 1) + read_flops(opts, w, m, L)
