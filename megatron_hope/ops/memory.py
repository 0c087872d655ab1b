"""Inner-loop memory updates: a matrix (linear) memory and a residual 2-layer MLP memory, each in a
token-by-token sequential form (the oracle: the math as written) and a chunk-parallel form (fast).

Conventions (hope_spec.md, "project decisions"): the inner loss is ||M(k_t) - v_t||^2 (factor 2 kept),
its gradient is taken at the chunk-start state (or at the init M_0 after a document start inside the
chunk), DGD multiplies the running state by (alpha_t I - eta_t k_t k_t^T), momentum S_t = beta_t S_{t-1} + g_t,
and the read-out at token t uses the state after writing token t (reading B). Chunk boundaries are the
multiples of chunk_size plus every document start. States, decays and scans run in fp32.

State dicts: linear {"W"} (d_v x d_k), MLP {"A" (w x m), "B" (m x w)}; with momentum also "S_<name>".
Leading dims are free (batch, heads, memories); gates have the leading dims and the time dim of keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_hope.ops.chunk_algebra import ChunkGates, MatrixWrite, MomentumForm

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


def _point(state: State, init: State, use_init: Tensor) -> State:
    """Gradient point of one token: the carried chunk-start state, or the init after a document start."""
    return {n: torch.where(use_init[..., None, None], init[n], state[n]) for n in init}


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


def _token_states(state: State, init: State, gates: ChunkGates, k: Tensor, v: Tensor, opts: MemoryOptions
                  ) -> tuple[list[State], list[State], list[State]]:
    """Per token of one chunk: gradient point P_t, state before the write, state after the write."""
    reset = gates.reset if gates.reset is not None else torch.zeros_like(gates.eta, dtype=torch.bool)
    first_seg = torch.cumsum(reset.long(), -1) == 0
    cur = dict(state)
    points, befores, afters = [], [], []
    for t in range(k.shape[-2]):
        P = _point(state, init, ~first_seg[..., t])
        # a document start restores the init and zeroes the momentum
        cur = {n: torch.where(reset[..., t, None, None], init[n] if n in init else torch.zeros_like(w), w)
               for n, w in cur.items()}
        beta = gates.log_beta[..., t, None, None].exp() if opts.momentum else None
        before = cur
        cur = _token_step(cur, P, k[..., t, :], v[..., t, :], gates.eta[..., t, None, None],
                          gates.log_alpha[..., t, None, None].exp(), beta, opts)
        points.append(P)
        befores.append(before)
        afters.append(cur)
    return points, befores, afters


def _stop_grad_states(states: list[State], points: list[State], gates: ChunkGates, shift: int) -> list[State]:
    """Stop-grad writes: state_t = g_t W_init(t) + const, where g_t (the segment's retention through t, or t-1
    with shift=1) and W_init(t) (the token's chunk-start point) carry the gradient and the increment does not."""
    reset = gates.reset if gates.reset is not None else torch.zeros_like(gates.eta, dtype=torch.bool)
    out, log_g = [], torch.zeros_like(gates.log_alpha[..., 0])
    for t, (st, P) in enumerate(zip(states, points)):
        log_g = torch.where(reset[..., t], torch.zeros_like(log_g), log_g) + (gates.log_alpha[..., t] if not shift else 0)
        g = log_g.exp()[..., None, None]
        out.append({n: (g * P[n] + (st[n] - g * P[n]).detach()) if n in P else st[n].detach() for n in st})
        if shift:
            log_g = log_g + gates.log_alpha[..., t]
    return out


def chunk_update_sequential(state: State, init: State, gates: ChunkGates, k: Tensor, v: Tensor,
                            q: Tensor | None, opts: MemoryOptions, read_memory: int | None = None
                            ) -> tuple[State, Tensor | None]:
    """One chunk, token by token (the oracle). k, v, q: (..., L, d); gates (..., L). With `read_memory`, the
    states carry a memory dim at -3 and only that memory is read (q then has size 1 there)."""
    if opts.differentiable:
        points, befores, afters = _token_states(state, init, gates, k, v, opts)
    else:
        with torch.no_grad():
            _, befores, afters = _token_states(state, init, gates, k, v, opts)
        first_seg = torch.cumsum(gates.reset.long(), -1) == 0 if gates.reset is not None else None
        points = [state if first_seg is None else _point(state, init, ~first_seg[..., t]) for t in range(len(afters))]
        befores = _stop_grad_states(befores, points, gates, shift=1)
        afters = _stop_grad_states(afters, points, gates, shift=0)
    reads = None
    if q is not None:
        src = {"after_write": afters, "before_write": befores, "chunk_start": points}[opts.readout]
        reads = torch.stack([apply_memory(src[t], q[..., t, None, :], opts)[..., 0, :] for t in range(len(src))], -2)
        if read_memory is not None:
            reads = reads.narrow(-3, read_memory % reads.shape[-3], 1)
    return afters[-1], reads


# ----------------------------------------------------------------------------- chunk-parallel form

def _errors(P: State, k: Tensor, v: Tensor, opts: MemoryOptions) -> dict[str, tuple[Tensor, Tensor]]:
    """Inner-gradient factors at a fixed point P: {matrix: (key, error)} with gradient = error^T key."""
    target = v
    if opts.self_target:
        target = apply_memory(P, v, opts)
    if opts.kind == "linear":
        return _clipped({"W": (k, 2 * (apply_memory(P, k, opts) - target))}, opts)
    a = k @ P["B"].transpose(-1, -2)  # (..., L, m)
    h = _act(opts)(a)
    dA = 2 * (k + h @ P["A"].transpose(-1, -2) - target)  # error at the output layer, (..., L, w)
    dB = _act_grad(a, opts) * (dA @ P["A"])  # backprop through A and sigma, (..., L, m)
    return _clipped({"A": (h, dA), "B": (k, dB)}, opts)


def _clipped(factors: dict[str, tuple[Tensor, Tensor]], opts: MemoryOptions) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-token gradient clipping on the factors: ||e k^T||_F = ||e|| ||k||."""
    if opts.grad_clip <= 0:
        return factors
    return {n: (key, err * clip_factor(err.norm(dim=-1) * key.norm(dim=-1), opts)[..., None])
            for n, (key, err) in factors.items()}


def chunk_update_chunked(state: State, init: State, gates: ChunkGates, k: Tensor, v: Tensor,
                         q: Tensor | None, opts: MemoryOptions, read_memory: int | None = None
                         ) -> tuple[State, Tensor | None]:
    """One chunk in dual form: errors at the chunk-start point, then triangular solves and masked matmuls.
    With `read_memory`, the states carry a memory dim at -3 and only that memory is read."""
    coef = gates.coefficients
    if not opts.differentiable:
        coef = coef.detached()
    factors = _errors({n: state[n] for n in init}, k, v, opts)
    if coef.first_seg is not None:  # tokens after a document start take their gradient at the init
        at_init = _errors(init, k, v, opts)
        use_init = ~coef.first_seg[..., None]
        factors = {n: tuple(torch.where(use_init, fi, fc) for fc, fi in zip(factors[n], at_init[n]))
                   for n in factors}
    writes: dict[str, MatrixWrite] = {}
    new: State = {}
    for n, (key, err) in factors.items():
        if not opts.differentiable:
            key, err = key.detach(), err.detach()
        dgd = opts.dgd == "each" or (opts.dgd == "first" and n in ("W", "B"))
        writes[n] = MatrixWrite.solve(coef, state[n], init[n], state.get("S_" + n), key, err, dgd,
                                      opts.differentiable)
        new[n], s = writes[n].final()
        if s is not None:
            new["S_" + n] = s
    if q is None:
        return new, None
    if read_memory is not None:
        writes = {n: w.select_memory(read_memory) for n, w in writes.items()}
    if opts.kind == "linear":
        return new, writes["W"].read(q, opts.readout)
    hq = _act(opts)(writes["B"].read(q, opts.readout))
    return new, q + writes["A"].read(hq, opts.readout)


# ----------------------------------------------------------------------------- whole sequence

def memory_scan(init: State, k: Tensor, v: Tensor, q: Tensor | None, eta: Tensor, log_alpha: Tensor,
                log_beta: Tensor | None, doc_start: Tensor | None, chunk_size: int, opts: MemoryOptions,
                state: State | None = None, impl: str = "chunked") -> tuple[Tensor | None, State]:
    """Run the memory over a sequence. k, v, q: (..., T, d); gates and doc_start: (..., T).

    Returns the read-outs of q (input dtype) and the final state (fp32), which a later call (the next
    sequence shard) can continue from. The whole inner loop runs in fp32, also under autocast.
    """
    with torch.autocast(k.device.type, enabled=False):
        return _memory_scan(init, k, v, q, eta, log_alpha, log_beta, doc_start, chunk_size, opts, state, impl)


def _memory_scan(init: State, k: Tensor, v: Tensor, q: Tensor | None, eta: Tensor, log_alpha: Tensor,
                 log_beta: Tensor | None, doc_start: Tensor | None, chunk_size: int, opts: MemoryOptions,
                 state: State | None, impl: str) -> tuple[Tensor | None, State]:
    dtype, sd = k.dtype, state_dtype(k.dtype)
    k, v = k.to(sd), v.to(sd)
    q = q.to(sd) if q is not None else None
    init = {n: w.to(sd) for n, w in init.items()}
    T = k.shape[-2]
    if state is None:
        state = initial_state(init, k.shape[:-2], opts)
    if log_beta is None and opts.momentum:
        raise ValueError("opts.momentum is on but no log_beta was given")
    step = chunk_update_chunked if impl == "chunked" else chunk_update_sequential
    outs = []
    for s in range(0, T, chunk_size):
        sl = slice(s, min(s + chunk_size, T))
        gates = ChunkGates(eta[..., sl].to(sd), log_alpha[..., sl].to(sd),
                           log_beta[..., sl].to(sd) if opts.momentum else None,
                           doc_start[..., sl] if doc_start is not None else None,
                           opts.momentum_form)
        state, out = step(state, init, gates, k[..., sl, :], v[..., sl, :],
                          q[..., sl, :] if q is not None else None, opts)
        outs.append(out)
    out = torch.cat(outs, dim=-2).to(dtype) if q is not None else None
    return out, state
