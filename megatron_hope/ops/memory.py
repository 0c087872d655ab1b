"""Inner-loop memory updates: a matrix (linear) memory and a residual 2-layer MLP memory, each in a
token-by-token sequential form (the oracle: the math as written) and a chunk-parallel form (fast).

Conventions (hope_spec.md, "project decisions"): the inner loss is ||M(k_t) - v_t||^2 (factor 2 kept),
its gradient is taken at the chunk-start state, DGD multiplies the running state by (alpha_t I - eta_t k_t k_t^T),
momentum S_t = beta_t S_{t-1} + g_t, and the read-out at token t uses the state after writing token t (reading B).
The chunk grid restarts at every document start (a document start restores the init and zeroes the momentum), so
a packed document computes what it computes alone (ops/packing.py). States, decays and scans run in fp32.

State dicts: linear {"W"} (d_v x d_k), MLP {"A" (w x m), "B" (m x w)}; with momentum also "S_<name>".
Leading dims are free (batch, heads, memories); gates have the leading dims and the time dim of keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_hope.ops import triton as kernels
from megatron_hope.ops.chunk_algebra import ChunkCoefficients, ChunkGates, MomentumForm, write_matrix
from megatron_hope.ops.dual_form_grad import dual_form_write
from megatron_hope.ops.packing import DocumentLayout

State = dict[str, Tensor]


@dataclass(frozen=True)
class MemoryOptions:
    kind: Literal["linear", "mlp"] = "mlp"
    momentum: bool = True
    momentum_form: MomentumForm = "hope"
    readout: Literal["after_write", "before_write", "chunk_start"] = "after_write"
    dgd: Literal["none", "first", "each"] = "first"  # MLP: factor on B (first) or on A and B (each)
    self_target: bool = False  # target v_hat = M_c(v) (self-modifying Titans) instead of v
    activation: Literal["silu", "gelu"] = "silu"
    differentiable: bool = True  # outer gradient through the writes; False = stop-grad writes
    grad_clip: float = 0.0  # > 0: each matrix's per-token inner gradient is rescaled to norm <= grad_clip
    recompute_chunks: int = 0  # > 0: save the state every this many chunks; backward recomputes them
    write_backward: Literal["manual", "autograd"] = "manual"  # the dual-form writes' backward (ops/dual_form_grad.py)


def _act(opts: MemoryOptions) -> Callable[[Tensor], Tensor]:
    return F.silu if opts.activation == "silu" else F.gelu


def _act_grad(a: Tensor, opts: MemoryOptions) -> Tensor:
    """sigma'(a) for the manual backprop of the inner loss."""
    if opts.activation == "silu":
        s = torch.sigmoid(a)
        return s * (1 + a * (1 - s))
    cdf = 0.5 * (1 + torch.erf(a / 2 ** 0.5))
    return cdf + a * torch.exp(-0.5 * a * a) / (2 * torch.pi) ** 0.5


def matrix_names(opts: MemoryOptions) -> tuple[str, ...]:
    return ("W",) if opts.kind == "linear" else ("A", "B")


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States, decays and scans run in fp32 (or fp64 when the inputs are fp64), whatever the input dtype."""
    return torch.promote_types(dtype, torch.float32)


def initial_state(init: State, batch_shape: torch.Size, opts: MemoryOptions) -> State:
    """The meta-learned init broadcast over `batch_shape`, momentum zero."""
    state: State = {}
    for name in matrix_names(opts):
        w = init[name].to(state_dtype(init[name].dtype))
        state[name] = w.expand(*batch_shape, *w.shape[-2:]) if w.dim() < len(batch_shape) + 2 else w
        if opts.momentum:
            state["S_" + name] = torch.zeros_like(state[name])
    return state


# ----------------------------------------------------------------------------- memory read (no writes)

def apply_memory(P: State, z: Tensor, opts: MemoryOptions) -> Tensor:
    """M(z) with fixed weights: W z (linear) or z + A sigma(B z) (MLP). P broadcasts over z's rows."""
    if opts.kind == "linear":
        return z @ P["W"].transpose(-1, -2)
    h = _act(opts)(z @ P["B"].transpose(-1, -2))
    return z + h @ P["A"].transpose(-1, -2)


# ----------------------------------------------------------------------------- sequential oracle

def clip_factor(grad_norm: Tensor, opts: MemoryOptions) -> Tensor:
    """Inner-update clipping (hope_spec.md 5.13): each matrix's per-token gradient is rescaled to Frobenius norm
    <= grad_clip. Every update is then bounded, and with retention alpha <= 1 and the DGD contraction the
    states stay bounded; without it, gradients taken at the stale chunk-start state compound across chunks."""
    return torch.clamp(opts.grad_clip / grad_norm.clamp_min(1e-12), max=1.0)


def _token_grads(P: State, k: Tensor, target: Tensor, opts: MemoryOptions) -> State:
    """Gradient of ||M_P(k) - target||^2 w.r.t. P, by autograd (independent of the chunked form's algebra)."""
    names = list(P)

    def loss(*weights: Tensor) -> Tensor:
        pred = apply_memory(dict(zip(names, weights)), k[..., None, :], opts)[..., 0, :]
        return ((pred - target) ** 2).sum()

    grads = torch.func.grad(loss, argnums=tuple(range(len(names))))(*[P[n] for n in names])
    if opts.grad_clip > 0:
        grads = tuple(g * clip_factor(g.flatten(-2).norm(dim=-1), opts)[..., None, None] for g in grads)
    return dict(zip(names, grads))


def _dgd_key(P: State, name: str, k: Tensor, opts: MemoryOptions) -> Tensor | None:
    """The input whose outer product forms the DGD factor for matrix `name`, or None (plain decay)."""
    if opts.dgd == "none":
        return None
    if name in ("W", "B"):
        return k
    if name == "A" and opts.dgd == "each":
        return _act(opts)((k[..., None, :] @ P["B"].transpose(-1, -2))[..., 0, :])
    return None


def _token_step(cur: State, P: State, kt: Tensor, vt: Tensor, eta: Tensor, alpha: Tensor, beta: Tensor | None,
                opts: MemoryOptions) -> State:
    """One token of the written rule: S = beta S + g; W = W (alpha I - eta k k^T) - eta S (or the titans form)."""
    target = apply_memory(P, vt[..., None, :], opts)[..., 0, :] if opts.self_target else vt
    grads = _token_grads(P, kt, target, opts)
    new = dict(cur)
    for n in matrix_names(opts):
        W = cur[n]
        key = _dgd_key(P, n, kt, opts)
        Wn = alpha * W
        if key is not None:
            Wn = Wn - eta * (W @ key[..., :, None]) @ key[..., None, :]
        if opts.momentum:
            if opts.momentum_form == "hope":
                new["S_" + n] = beta * cur["S_" + n] + grads[n]
                Wn = Wn - eta * new["S_" + n]
            else:
                new["S_" + n] = beta * cur["S_" + n] - eta * grads[n]
                Wn = Wn + new["S_" + n]
        else:
            Wn = Wn - eta * grads[n]
        new[n] = Wn
    return new


TokenInputs = Callable[[State, int], tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor, Tensor | None]]


def _attach(values: State, point: State, log_g: Tensor) -> State:
    """Stop-grad writes: state = g P + const, where g (the retention since the chunk-start point P) and P carry
    the gradient and the written increment does not; momenta carry none."""
    g = log_g.exp()[..., None, None]
    return {n: g * point[n] + (w - g * point[n]).detach() if n in point else w.detach() for n, w in values.items()}


def sequential_scan(init: State, state: State, inputs: TokenInputs, doc_start: Tensor | None, T: int,
                    chunk_size: int, opts: MemoryOptions, read_memory: int | None = None
                    ) -> tuple[Tensor | None, State]:
    """The oracle: the written rule one token at a time, on the per-document chunk grid.

    `inputs(P, t)` gives token t's (k, v, q, eta, log_alpha, log_beta) from the gradient point P (the state at
    the token's chunk start; the self-modifying scan generates its keys and gates there). A chunk starts at the
    call's first token, at every document start and every chunk_size tokens after one; a document start
    restores the init and zeroes the momentum. doc_start broadcasts against the states' leading dims.
    """
    cur, point = dict(state), {n: state[n] for n in init}
    device = next(iter(init.values())).device
    phase = torch.zeros((), dtype=torch.long, device=device)  # tokens since the chunk start (per row with documents)
    log_g = torch.zeros((), device=device)  # stop-grad writes: log-retention since the point
    reads = []
    for t in range(T):
        if doc_start is not None:
            reset = doc_start[..., t]
            cur = {n: torch.where(reset[..., None, None], init[n] if n in init else torch.zeros_like(w), w)
                   for n, w in cur.items()}
            phase = torch.where(reset, 0, phase)
        on_grid = (phase == 0)[..., None, None]
        point = {n: torch.where(on_grid, cur[n], point[n]) for n in point}
        k, v, q, eta, log_alpha, log_beta = inputs(point, t)
        beta = log_beta.exp()[..., None, None] if opts.momentum else None
        before = cur
        if opts.differentiable:
            cur = _token_step(cur, point, k, v, eta[..., None, None], log_alpha.exp()[..., None, None], beta, opts)
        else:
            log_g = torch.where(on_grid[..., 0, 0], 0.0, log_g)
            with torch.no_grad():
                values = _token_step({n: w.detach() for n, w in cur.items()}, {n: w.detach() for n, w in point.items()},
                                     k.detach(), v.detach(), eta.detach()[..., None, None],
                                     log_alpha.detach().exp()[..., None, None],
                                     None if beta is None else beta.detach(), opts)
            log_g = log_g + log_alpha
            cur = _attach(values, point, log_g)
        phase = (phase + 1) % chunk_size
        if q is not None:
            src = {"after_write": cur, "before_write": before, "chunk_start": point}[opts.readout]
            if read_memory is not None:
                src = {n: w.narrow(-3, read_memory % w.shape[-3], 1) for n, w in src.items()}
            reads.append(apply_memory(src, q[..., None, :], opts)[..., 0, :])
    return (torch.stack(reads, -2) if reads else None), cur


# ----------------------------------------------------------------------------- chunk-parallel form

def _errors(P: State, k: Tensor, v: Tensor, opts: MemoryOptions) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Inner-gradient factors at a fixed point P: {matrix: (key, error, P[matrix] applied to the key)} with
    gradient = error^T key (the third is the DGD solve's term, computed here anyway)."""
    target = v
    if opts.self_target:
        target = apply_memory(P, v, opts)
    if opts.kind == "linear":
        kw = k @ P["W"].transpose(-1, -2)
        return _clipped({"W": (k, 2 * (kw - target), kw)}, opts)
    a = k @ P["B"].transpose(-1, -2)  # (..., L, m)
    h = _act(opts)(a)
    ha = h @ P["A"].transpose(-1, -2)
    dA = 2 * (k + ha - target)  # error at the output layer, (..., L, w)
    dB = _act_grad(a, opts) * (dA @ P["A"])  # backprop through A and sigma, (..., L, m)
    return _clipped({"A": (h, dA, ha), "B": (k, dB, a)}, opts)


def _clipped(factors: dict[str, tuple[Tensor, Tensor, Tensor]], opts: MemoryOptions
             ) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Per-token gradient clipping on the factors: ||e k^T||_F = ||e|| ||k||."""
    if opts.grad_clip <= 0:
        return factors
    return {n: (key, err * clip_factor(err.norm(dim=-1) * key.norm(dim=-1), opts)[..., None], kw)
            for n, (key, err, kw) in factors.items()}


def chunk_update(state: State, coef: ChunkCoefficients, k: Tensor, v: Tensor, q: Tensor | None, opts: MemoryOptions,
                 read_memory: int | None = None, last: Tensor | None = None) -> tuple[State, Tensor | None]:
    """One chunk in dual form (no document starts inside it): errors at the chunk-start state, then a
    triangular solve and masked matmuls. With `read_memory`, the states carry a memory dim at -3 and only that
    memory is read; with `last` (the gates' leading dims), the new state is the one after that token."""
    if not opts.differentiable:
        coef = coef.detached()
    factors = _errors({n: state[n] for n in matrix_names(opts)}, k, v, opts)
    # the hand-written backward, or autograd through the same math (the reference)
    write_fn = dual_form_write if opts.write_backward == "manual" else write_matrix
    new: State = dict.fromkeys(state)  # the state's key order

    def write(n: str, Z: Tensor | None) -> Tensor | None:
        key, err, kw = factors[n]
        if not opts.differentiable:
            key, err = key.detach(), err.detach()
        new[n], s, out = write_fn(coef, state[n], state.get("S_" + n), key, err, kw, _has_dgd(n, opts),
                                  opts.differentiable, last, Z, opts.readout, read_memory)
        if s is not None:
            new["S_" + n] = s
        return out

    if opts.kind == "linear":
        return new, write("W", q)
    h = write("B", q)
    out = write("A", None if q is None else _act(opts)(h))
    return new, None if q is None else q + out


def _has_dgd(name: str, opts: MemoryOptions) -> bool:
    """Whether the DGD factor multiplies matrix `name` (W and B: key k; A with dgd = "each": key sigma(B k))."""
    return opts.dgd == "each" or (opts.dgd == "first" and name in ("W", "B"))


def scan_chunks(step: Callable[[State, int], tuple[State, Tensor | None]], state: State, starts: range,
                opts: MemoryOptions) -> tuple[State, Tensor | None]:
    """state, out_c = step(state, start_c) over the chunks, outputs concatenated along time. With
    opts.recompute_chunks = n > 0, every n chunks run under activation checkpointing: the forward keeps only the
    state at the start of each group (and views of the inputs), so the inner loop's saved activations are
    O(T/(nC) x state) instead of O(T x intermediates); the backward recomputes a group at a time, last first."""
    def run(state: State, group: range) -> tuple[State, Tensor | None]:
        outs = []
        for s in group:
            state, out = step(state, s)
            outs.append(out)
        return state, None if outs[0] is None else torch.cat(outs, dim=-2)

    n = opts.recompute_chunks
    if n <= 0 or not torch.is_grad_enabled():
        return run(state, starts)
    outs = []
    for i in range(0, len(starts), n):
        state, out = torch.utils.checkpoint.checkpoint(run, state, starts[i:i + n], use_reentrant=False)
        outs.append(out)
    return state, None if outs[0] is None else torch.cat(outs, dim=-2)


def chunk_coefficients(eta: Tensor, log_alpha: Tensor, log_beta: Tensor | None, chunk_size: int,
                       opts: MemoryOptions) -> list[ChunkCoefficients]:
    """The coefficients of every chunk at once, for gates that do not depend on the state (Titans): the full
    chunks in one batch, a shorter last chunk on its own."""
    n, tail = divmod(eta.shape[-1], chunk_size)

    def build(sl: slice, shape: tuple[int, ...]) -> ChunkCoefficients:
        def cut(t: Tensor) -> Tensor:
            return t[..., sl].unflatten(-1, shape)
        return ChunkCoefficients.build(ChunkGates(cut(eta), cut(log_alpha), cut(log_beta) if opts.momentum else None,
                                                  opts.momentum_form))

    coefs = build(slice(0, n * chunk_size), (n, chunk_size)).unbind_chunks() if n else []
    if tail:
        coefs += build(slice(n * chunk_size, None), (1, tail)).unbind_chunks()
    return coefs


def restart_documents(state: State, init: State, reset: Tensor) -> State:
    """Rows where `reset` (the states' leading dims) holds start a document: the init, momentum zero."""
    r = reset[..., None, None]
    return {n: torch.where(r, init[n] if n in init else torch.zeros_like(w), w) for n, w in state.items()}


def keep_finished_rows(active: Tensor, new: State, old: State) -> State:
    """Rows past their last token (`active` False) keep their state through trailing pads."""
    a = active.view(*active.shape, *[1] * (next(iter(new.values())).dim() - active.dim()))
    return {n: torch.where(a, w, old[n]) for n, w in new.items()}


# ----------------------------------------------------------------------------- whole sequence

def resolve_impl(impl: str, opts: MemoryOptions | None = None, device: torch.device | None = None) -> str:
    """The scan implementation for model.memory.impl. "auto": the Triton kernels ("triton") on a CUDA device when
    triton imports and the kernels cover `opts`, else the chunk-parallel PyTorch form ("torch"; "chunked" is its
    earlier name). "sequential" is the token-by-token oracle."""
    if impl == "chunked":
        return "torch"
    if impl != "auto":
        return impl
    if (opts is not None and device is not None and device.type == "cuda" and kernels.available()
            and kernels.unsupported(opts) is None):
        return "triton"
    return "torch"


def memory_scan(init: State, k: Tensor, v: Tensor, q: Tensor | None, eta: Tensor, log_alpha: Tensor,
                log_beta: Tensor | None, doc_start: Tensor | None, chunk_size: int, opts: MemoryOptions,
                state: State | None = None, impl: str = "torch") -> tuple[Tensor | None, State]:
    """Run the memory over a sequence. k, v, q: (..., T, d); gates and doc_start: (..., T).

    impl: "torch" (chunk-parallel), "triton" (the fused kernels of ops/triton/, on CUDA) or
    "sequential" (the token-by-token oracle). Returns the read-outs of q
    (input dtype) and the final state (fp32), which a later call (the next sequence shard) can continue from
    when it starts on every row's chunk grid. The whole inner loop runs in fp32, also under autocast.
    """
    with torch.autocast(k.device.type, enabled=False):
        return _memory_scan(init, k, v, q, eta, log_alpha, log_beta, doc_start, chunk_size, opts, state, impl)


def _memory_scan(init: State, k: Tensor, v: Tensor, q: Tensor | None, eta: Tensor, log_alpha: Tensor,
                 log_beta: Tensor | None, doc_start: Tensor | None, chunk_size: int, opts: MemoryOptions,
                 state: State | None, impl: str) -> tuple[Tensor | None, State]:
    dtype, sd = k.dtype, state_dtype(k.dtype)
    k, v, eta, log_alpha = k.to(sd), v.to(sd), eta.to(sd), log_alpha.to(sd)
    q = q.to(sd) if q is not None else None
    log_beta = log_beta.to(sd) if log_beta is not None else None
    init = {n: w.to(sd) for n, w in init.items()}
    if state is None:
        state = initial_state(init, k.shape[:-2], opts)
    if log_beta is None and opts.momentum:
        raise ValueError("opts.momentum is on but no log_beta was given")
    if impl == "sequential":
        def inputs(P: State, t: int):
            return (k[..., t, :], v[..., t, :], None if q is None else q[..., t, :], eta[..., t], log_alpha[..., t],
                    log_beta[..., t] if opts.momentum else None)
        out, state = sequential_scan(init, state, inputs, doc_start, k.shape[-2], chunk_size, opts)
        return (out.to(dtype) if out is not None else None), state
    if impl == "triton":
        from megatron_hope.ops.triton.scan import kernel_memory_scan  # triton is an optional import
        out, state = kernel_memory_scan(init, k, v, q, eta, log_alpha, log_beta, doc_start, chunk_size, opts, state)
        return (out.to(dtype) if out is not None else None), state
    if impl != "torch":
        raise ValueError(f"memory impl {impl!r}: expected 'torch', 'triton' or 'sequential'")
    layout = DocumentLayout.build(doc_start, chunk_size) if doc_start is not None else None
    if layout is not None:  # pads write nothing: zero keys and learning rates, unit decays
        k, v = layout.scatter(k, -2), layout.scatter(v, -2)
        q = layout.scatter(q, -2) if q is not None else None
        eta, log_alpha = layout.scatter(eta, -1), layout.scatter(log_alpha, -1)
        log_beta = layout.scatter(log_beta, -1) if log_beta is not None else None
        doc_start = layout.doc_start
    # the gates do not depend on the state: every chunk's coefficients at once, unless chunks are recomputed in
    # backward (then each chunk builds its own, so that they are not kept through the scan)
    coefs = chunk_coefficients(eta, log_alpha, log_beta, chunk_size, opts) if opts.recompute_chunks <= 0 else None

    def step(state: State, s: int) -> tuple[State, Tensor | None]:
        sl = slice(s, s + chunk_size)
        if doc_start is not None:
            state = restart_documents(state, init, doc_start[..., s])
        coef = coefs[s // chunk_size] if coefs is not None else ChunkCoefficients.build(ChunkGates(
            eta[..., sl], log_alpha[..., sl], log_beta[..., sl] if opts.momentum else None, opts.momentum_form))
        last = layout.last_in_chunk(s, coef.g.shape[-1]) if layout is not None else None
        new, out = chunk_update(state, coef, k[..., sl, :], v[..., sl, :], q[..., sl, :] if q is not None else None,
                                opts, last=last)
        return (new if layout is None else keep_finished_rows(layout.row_active(s), new, state)), out

    state, out = scan_chunks(step, state, range(0, k.shape[-2], chunk_size), opts)
    if out is None:
        return None, state
    return (layout.gather(out, -2) if layout is not None else out).to(dtype), state
