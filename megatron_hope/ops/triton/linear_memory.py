"""The linear (matrix) memory's scan as two Triton kernels: a forward and a backward, one program per row
(batch x head x memory), each looping over the row's chunks with the state W (and momentum S) on chip.

Inside a chunk the kernels apply the written rule token by token (ops/memory.py's conventions): the error
e_t = 2 (W_c k_t - v_t) (target W_c v_t with self_target) at the chunk-start state W_c, clipped per token to
||e_t k_t^T|| <= grad_clip; S_t = beta_t S_{t-1} + e_t k_t^T; W_t = W_{t-1} (alpha_t I - eta_t k_t k_t^T) - eta_t S_t
(or the titans form S_t = beta_t S_{t-1} - eta_t e_t k_t^T, W_t = ... + S_t); the read-out W_t q_t (or W_{t-1} q_t,
or W_c q_t). Rows run on the per-document chunk grid of ops/packing.py: a document starts at a chunk start,
where the state is restored to the init and the momentum zeroed, and pads change nothing.

The forward keeps only the state at every chunk start (O(T/C x state) per row). The backward walks the chunks
last first: it recomputes a chunk's states from its start into a per-row scratch of C states, then runs the
reverse recurrence through the chunk's tokens, carrying dW and dS, and adds the gradient of the chunk's errors
with respect to W_c where the chunk starts. Per token the work is a few d x d element-wise products and
reductions (no tensor cores): a first fused form whose aim is a constant number of launches per layer.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from megatron_hope.ops.memory import MemoryOptions, State
from megatron_hope.ops.packing import DocumentLayout
from megatron_hope.ops.triton import unsupported

_MOMENTUM = {None: 0, "hope": 1, "titans": 2}
_READOUT = {"after_write": 0, "before_write": 1, "chunk_start": 2}


# ----------------------------------------------------------------------------- per-token math, shared

@triton.jit
def _mv(w, x):
    """W x for a (BD, BD) tile and a (BD,) vector."""
    return tl.sum(w * x[None, :], axis=1)


@triton.jit
def _mtv(w, y):
    """W^T y."""
    return tl.sum(w * y[:, None], axis=0)


@triton.jit
def _outer(y, x):
    return y[:, None] * x[None, :]


@triton.jit
def _raw_error(w_c, k, v, SELF_TARGET: tl.constexpr):
    """2 (W_c k - target): the inner loss's gradient factor at the chunk-start state, before clipping."""
    target = v
    if SELF_TARGET:
        target = _mv(w_c, v)
    return 2 * (_mv(w_c, k) - target)


@triton.jit
def _clip_factor(e_raw, k, clip):
    """min(1, clip / ||e k^T||) with ||e k^T||_F = ||e|| ||k|| (ops/memory.clip_factor)."""
    norm = tl.sqrt(tl.sum(e_raw * e_raw)) * tl.sqrt(tl.sum(k * k))
    return tl.minimum(clip / tl.maximum(norm, 1e-12), 1.0)


@triton.jit
def _write(w, s, k, e, eta, alpha, beta, MOMENTUM: tl.constexpr, DGD: tl.constexpr):
    """One token's write: the state and momentum after it."""
    w_new = alpha * w
    if DGD:
        w_new = w_new - eta * _outer(_mv(w, k), k)
    g = _outer(e, k)
    if MOMENTUM == 1:
        s = beta * s + g
        w_new = w_new - eta * s
    elif MOMENTUM == 2:
        s = beta * s - eta * g
        w_new = w_new + s
    else:
        w_new = w_new - eta * g
    return w_new, s


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _forward_kernel(k_ptr, v_ptr, q_ptr, eta_ptr, la_ptr, lb_ptr, real_ptr, reset_ptr, w0_ptr, w_in_ptr, s_in_ptr,
                    o_ptr, w_out_ptr, s_out_ptr, ck_w_ptr, ck_s_ptr, n_chunks, clip,
                    D: tl.constexpr, BD: tl.constexpr, CHUNK: tl.constexpr, MOMENTUM: tl.constexpr,
                    DGD: tl.constexpr, SELF_TARGET: tl.constexpr, READOUT: tl.constexpr, CLIP: tl.constexpr):
    i_n = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_dd = o_d[:, None] * D + o_d[None, :]
    m_dd = m_d[:, None] & m_d[None, :]
    T = n_chunks * CHUNK
    p_mat = i_n * D * D + o_dd
    b_w0 = tl.load(w0_ptr + p_mat, mask=m_dd, other=0.0)
    b_w = tl.load(w_in_ptr + p_mat, mask=m_dd, other=0.0)
    b_s = b_w * 0
    if MOMENTUM != 0:
        b_s = tl.load(s_in_ptr + p_mat, mask=m_dd, other=0.0)
    for i_c in range(n_chunks):
        reset = tl.load(reset_ptr + i_n * n_chunks + i_c) != 0  # a document starts here: init, zero momentum
        b_w = tl.where(reset, b_w0, b_w)
        b_s = tl.where(reset, b_s * 0, b_s)
        p_ck = (i_n * n_chunks + i_c) * D * D + o_dd
        tl.store(ck_w_ptr + p_ck, b_w, mask=m_dd)
        if MOMENTUM != 0:
            tl.store(ck_s_ptr + p_ck, b_s, mask=m_dd)
        b_wc = b_w
        for i_t in range(CHUNK):
            p_t = i_n * T + i_c * CHUNK + i_t
            b_k = tl.load(k_ptr + p_t * D + o_d, mask=m_d, other=0.0)
            b_v = tl.load(v_ptr + p_t * D + o_d, mask=m_d, other=0.0)
            b_q = tl.load(q_ptr + p_t * D + o_d, mask=m_d, other=0.0)
            eta = tl.load(eta_ptr + p_t)
            alpha = tl.exp(tl.load(la_ptr + p_t))
            beta = tl.exp(tl.load(lb_ptr + p_t))
            real = tl.load(real_ptr + p_t) != 0
            b_e = _raw_error(b_wc, b_k, b_v, SELF_TARGET)
            if CLIP:
                b_e = b_e * _clip_factor(b_e, b_k, clip)
            b_before = b_w
            b_wn, b_sn = _write(b_w, b_s, b_k, b_e, eta, alpha, beta, MOMENTUM, DGD)
            b_w = tl.where(real, b_wn, b_w)  # pads write nothing
            b_s = tl.where(real, b_sn, b_s)
            b_read = b_w
            if READOUT == 1:
                b_read = b_before
            elif READOUT == 2:
                b_read = b_wc
            tl.store(o_ptr + p_t * D + o_d, _mv(b_read, b_q), mask=m_d)
    tl.store(w_out_ptr + p_mat, b_w, mask=m_dd)
    if MOMENTUM != 0:
        tl.store(s_out_ptr + p_mat, b_s, mask=m_dd)


@triton.jit
def _backward_kernel(k_ptr, v_ptr, q_ptr, eta_ptr, la_ptr, lb_ptr, real_ptr, reset_ptr, ck_w_ptr, ck_s_ptr,
                     do_ptr, dw_out_ptr, ds_out_ptr, scr_w_ptr, scr_s_ptr,
                     dk_ptr, dv_ptr, dq_ptr, deta_ptr, dla_ptr, dlb_ptr, dw0_ptr, dw_in_ptr, ds_in_ptr,
                     n_chunks, clip,
                     D: tl.constexpr, BD: tl.constexpr, CHUNK: tl.constexpr, MOMENTUM: tl.constexpr,
                     DGD: tl.constexpr, SELF_TARGET: tl.constexpr, READOUT: tl.constexpr, CLIP: tl.constexpr):
    i_n = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_dd = o_d[:, None] * D + o_d[None, :]
    m_dd = m_d[:, None] & m_d[None, :]
    T = n_chunks * CHUNK
    p_mat = i_n * D * D + o_dd
    p_scr = i_n * CHUNK * D * D + o_dd
    b_dw = tl.load(dw_out_ptr + p_mat, mask=m_dd, other=0.0)  # gradient w.r.t. the state between tokens
    b_ds = b_dw * 0
    if MOMENTUM != 0:
        b_ds = tl.load(ds_out_ptr + p_mat, mask=m_dd, other=0.0)
    b_dw0 = b_dw * 0
    for j in range(n_chunks):
        i_c = n_chunks - 1 - j
        p_ck = (i_n * n_chunks + i_c) * D * D + o_dd
        b_wc = tl.load(ck_w_ptr + p_ck, mask=m_dd, other=0.0)
        b_w = b_wc
        b_s = b_wc * 0
        if MOMENTUM != 0:
            b_s = tl.load(ck_s_ptr + p_ck, mask=m_dd, other=0.0)
        # recompute the chunk: the state and momentum before each token, into the scratch
        for i_t in range(CHUNK):
            p_t = i_n * T + i_c * CHUNK + i_t
            tl.store(scr_w_ptr + p_scr + i_t * D * D, b_w, mask=m_dd)
            if MOMENTUM != 0:
                tl.store(scr_s_ptr + p_scr + i_t * D * D, b_s, mask=m_dd)
            b_k = tl.load(k_ptr + p_t * D + o_d, mask=m_d, other=0.0)
            b_v = tl.load(v_ptr + p_t * D + o_d, mask=m_d, other=0.0)
            b_e = _raw_error(b_wc, b_k, b_v, SELF_TARGET)
            if CLIP:
                b_e = b_e * _clip_factor(b_e, b_k, clip)
            b_wn, b_sn = _write(b_w, b_s, b_k, b_e, tl.load(eta_ptr + p_t), tl.exp(tl.load(la_ptr + p_t)),
                                tl.exp(tl.load(lb_ptr + p_t)), MOMENTUM, DGD)
            real = tl.load(real_ptr + p_t) != 0
            b_w = tl.where(real, b_wn, b_w)
            b_s = tl.where(real, b_sn, b_s)
        tl.debug_barrier()
        b_wa = b_w  # the state after the token being differentiated
        b_dwc = b_dw * 0  # gradient w.r.t. W_c through the chunk's errors and chunk-start reads
        for i in range(CHUNK):
            i_t = CHUNK - 1 - i
            p_t = i_n * T + i_c * CHUNK + i_t
            b_k = tl.load(k_ptr + p_t * D + o_d, mask=m_d, other=0.0)
            b_v = tl.load(v_ptr + p_t * D + o_d, mask=m_d, other=0.0)
            b_q = tl.load(q_ptr + p_t * D + o_d, mask=m_d, other=0.0)
            b_do = tl.load(do_ptr + p_t * D + o_d, mask=m_d, other=0.0)
            eta = tl.load(eta_ptr + p_t)
            alpha = tl.exp(tl.load(la_ptr + p_t))
            beta = tl.exp(tl.load(lb_ptr + p_t))
            real = tl.load(real_ptr + p_t) != 0
            b_wp = tl.load(scr_w_ptr + p_scr + i_t * D * D, mask=m_dd, other=0.0)
            b_sp = b_wp * 0
            if MOMENTUM != 0:
                b_sp = tl.load(scr_s_ptr + p_scr + i_t * D * D, mask=m_dd, other=0.0)
            b_er = _raw_error(b_wc, b_k, b_v, SELF_TARGET)
            b_e = b_er
            if CLIP:
                b_e = b_er * _clip_factor(b_er, b_k, clip)
            # the read-out o = W q (W_t, W_{t-1} or W_c)
            if READOUT == 0:
                b_dq = _mtv(b_wa, b_do)
                b_dw = b_dw + _outer(b_do, b_q)
            elif READOUT == 1:
                b_dq = _mtv(b_wp, b_do)
            else:
                b_dq = _mtv(b_wc, b_do)
                b_dwc = b_dwc + _outer(b_do, b_q)
            # the write W_t = alpha W' - eta [dgd] (W' k) k^T - eta S_t (hope form), given dW_t, dS_t
            b_dwk = _mv(b_dw, b_k)
            b_dwp = alpha * b_dw
            d_la = alpha * tl.sum(b_dw * b_wp)
            d_eta = tl.sum(b_dwk * 0)
            b_dk = b_k * 0
            if DGD:
                b_xk = _mv(b_wp, b_k)
                d_eta = d_eta - tl.sum(b_dwk * b_xk)
                b_dk = b_dk - eta * (_mtv(b_wp, b_dwk) + _mtv(b_dw, b_xk))
                b_dwp = b_dwp - eta * _outer(b_dwk, b_k)
            b_dsp = b_ds
            d_lb = d_eta * 0
            if MOMENTUM == 1:  # S_t = beta S' + e k^T
                b_dst = b_ds - eta * b_dw
                d_eta = d_eta - tl.sum(b_dw * (beta * b_sp + _outer(b_e, b_k)))
                b_de = _mv(b_dst, b_k)
                b_dk = b_dk + _mtv(b_dst, b_e)
                b_dsp = beta * b_dst
                d_lb = beta * tl.sum(b_dst * b_sp)
            elif MOMENTUM == 2:  # S_t = beta S' - eta e k^T, W_t = ... + S_t
                b_dst = b_ds + b_dw
                b_dstk = _mv(b_dst, b_k)
                d_eta = d_eta - tl.sum(b_dstk * b_e)
                b_de = -eta * b_dstk
                b_dk = b_dk - eta * _mtv(b_dst, b_e)
                b_dsp = beta * b_dst
                d_lb = beta * tl.sum(b_dst * b_sp)
            else:
                d_eta = d_eta - tl.sum(b_dwk * b_e)
                b_de = -eta * b_dwk
                b_dk = b_dk - eta * _mtv(b_dw, b_e)
            b_der = b_de
            if CLIP:  # e = c e_raw, c = clip / (||e_raw|| ||k||) where that is <= 1
                ne2 = tl.maximum(tl.sum(b_er * b_er), 1e-30)
                nk2 = tl.maximum(tl.sum(b_k * b_k), 1e-30)
                c_raw = clip / tl.maximum(tl.sqrt(ne2) * tl.sqrt(nk2), 1e-12)
                clipped = c_raw <= 1.0
                b_der = tl.where(clipped, c_raw * (b_de - b_er * (tl.sum(b_er * b_de) / ne2)), b_de)
                b_dk = b_dk - tl.where(clipped, tl.sum(b_e * b_de) / nk2, 0.0) * b_k
            # e_raw = 2 (W_c k - target)
            b_dk = b_dk + 2 * _mtv(b_wc, b_der)
            b_g_wc = _outer(2 * b_der, b_k)
            if SELF_TARGET:
                b_g_wc = b_g_wc - _outer(2 * b_der, b_v)
                b_dv = -2 * _mtv(b_wc, b_der)
            else:
                b_dv = -2 * b_der
            b_dwc = b_dwc + tl.where(real, b_g_wc, b_g_wc * 0)  # pads: no write, no gradient
            b_dw = tl.where(real, b_dwp, b_dw)
            b_ds = tl.where(real, b_dsp, b_ds)
            if READOUT == 1:
                b_dw = b_dw + _outer(b_do, b_q)
            tl.store(dk_ptr + p_t * D + o_d, tl.where(real, b_dk, b_dk * 0), mask=m_d)
            tl.store(dv_ptr + p_t * D + o_d, tl.where(real, b_dv, b_dv * 0), mask=m_d)
            tl.store(dq_ptr + p_t * D + o_d, b_dq, mask=m_d)
            tl.store(deta_ptr + p_t, tl.where(real, d_eta, d_eta * 0))
            tl.store(dla_ptr + p_t, tl.where(real, d_la, d_la * 0))
            tl.store(dlb_ptr + p_t, tl.where(real, d_lb, d_lb * 0))
            b_wa = b_wp
        tl.debug_barrier()  # the next chunk's recompute overwrites the scratch
        b_dw = b_dw + b_dwc
        reset = tl.load(reset_ptr + i_n * n_chunks + i_c) != 0  # the chunk-start state was the init
        b_dw0 = b_dw0 + tl.where(reset, b_dw, b_dw * 0)
        b_dw = tl.where(reset, b_dw * 0, b_dw)
        b_ds = tl.where(reset, b_ds * 0, b_ds)
    tl.store(dw0_ptr + p_mat, b_dw0, mask=m_dd)
    tl.store(dw_in_ptr + p_mat, b_dw, mask=m_dd)
    if MOMENTUM != 0:
        tl.store(ds_in_ptr + p_mat, b_ds, mask=m_dd)


# ----------------------------------------------------------------------------- autograd and launcher

def _constants(opts: MemoryOptions, d: int, chunk_size: int) -> dict:
    return dict(D=d, BD=triton.next_power_of_2(d), CHUNK=chunk_size,
                MOMENTUM=_MOMENTUM[opts.momentum_form if opts.momentum else None], DGD=opts.dgd != "none",
                SELF_TARGET=opts.self_target, READOUT=_READOUT[opts.readout], CLIP=opts.grad_clip > 0)


class _LinearMemoryScan(torch.autograd.Function):
    """Rows flattened: k, v, q (N, T', d) with T' a multiple of the chunk; gates (N, T'); real (N, T') and
    reset (N, T'/C) int8; w0, w_in, s_in (N, d, d). Returns the read-outs and the final state and momentum."""

    @staticmethod
    def forward(ctx, k, v, q, eta, log_alpha, log_beta, w0, w_in, s_in, real, reset, opts, chunk_size):
        N, T, d = k.shape
        n_chunks = T // chunk_size
        o = torch.empty_like(q)
        w_out, s_out = torch.empty_like(w_in), torch.empty_like(s_in)
        ck_w = k.new_empty(N, n_chunks, d, d)
        ck_s = torch.empty_like(ck_w) if opts.momentum else ck_w
        _forward_kernel[(N,)](k, v, q, eta, log_alpha, log_beta, real, reset, w0, w_in, s_in, o, w_out, s_out,
                              ck_w, ck_s, n_chunks, float(opts.grad_clip), **_constants(opts, d, chunk_size))
        ctx.save_for_backward(k, v, q, eta, log_alpha, log_beta, real, reset, ck_w, ck_s)
        ctx.opts, ctx.chunk_size = opts, chunk_size
        if not opts.momentum:
            ctx.mark_non_differentiable(s_out)
        return o, w_out, s_out

    @staticmethod
    def backward(ctx, d_o, d_w, d_s):
        k, v, q, eta, log_alpha, log_beta, real, reset, ck_w, ck_s = ctx.saved_tensors
        opts, chunk_size = ctx.opts, ctx.chunk_size
        N, T, d = k.shape
        zeros = k.new_zeros(N, d, d)
        d_o = torch.zeros_like(q) if d_o is None else d_o.contiguous()
        d_w = zeros if d_w is None else d_w.contiguous()
        d_s = zeros if d_s is None or not opts.momentum else d_s.contiguous()
        scratch_w = k.new_empty(N, chunk_size, d, d)
        scratch_s = torch.empty_like(scratch_w) if opts.momentum else scratch_w
        dk, dv, dq = torch.empty_like(k), torch.empty_like(v), torch.empty_like(q)
        d_eta, d_la, d_lb = torch.empty_like(eta), torch.empty_like(log_alpha), torch.empty_like(log_beta)
        d_w0, d_w_in, d_s_in = torch.empty_like(zeros), torch.empty_like(zeros), torch.zeros_like(zeros)
        _backward_kernel[(N,)](k, v, q, eta, log_alpha, log_beta, real, reset, ck_w, ck_s, d_o, d_w, d_s,
                               scratch_w, scratch_s, dk, dv, dq, d_eta, d_la, d_lb, d_w0, d_w_in, d_s_in,
                               T // chunk_size, float(opts.grad_clip), **_constants(opts, d, chunk_size))
        return dk, dv, dq, d_eta, d_la, d_lb, d_w0, d_w_in, d_s_in, None, None, None, None


def linear_memory_scan(init: State, k: Tensor, v: Tensor, q: Tensor | None, eta: Tensor, log_alpha: Tensor,
                       log_beta: Tensor | None, doc_start: Tensor | None, chunk_size: int, opts: MemoryOptions,
                       state: State) -> tuple[Tensor | None, State]:
    """The linear memory's scan on the kernels, called by ops.memory.memory_scan (impl "triton") with its
    arguments already in the state dtype and the carried state built: the same results and gradients as the
    torch form.

    k, v, q: (..., T, d); eta, log_alpha, log_beta, doc_start: (..., T); init {"W": broadcasting to (..., d, d)};
    state {"W"(, "S_W")} (..., d, d). Returns the read-outs (..., T', d) (None without q) and the final state.
    """
    reason = unsupported(opts)
    if reason is not None:
        raise ValueError(f"the Triton linear-memory kernel does not support {reason}; use model.memory.impl = "
                         "'torch'")
    if k.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton kernels run on CUDA tensors (these are on {k.device.type}; tests run them "
                         "under Triton's interpreter, TRITON_INTERPRET=1): use model.memory.impl = 'auto'")
    lead, (T, d) = k.shape[:-2], k.shape[-2:]
    streams = [k, v, q if q is not None else torch.zeros_like(k)]
    gates = [eta, log_alpha, log_beta if log_beta is not None else torch.zeros_like(eta)]
    layout = DocumentLayout.build(doc_start.expand(*lead, T), chunk_size, rounded=False) \
        if doc_start is not None else None
    if layout is not None:  # documents moved to chunk starts; the kernels skip the pads
        streams = [layout.scatter(x, -2) for x in streams]
        gates = [layout.scatter(g, -1) for g in gates]
        real, starts = layout.keep, layout.doc_start
    else:
        real = torch.ones(*lead, T, dtype=torch.bool, device=k.device)
        starts = doc_start.expand(*lead, T) if doc_start is not None else torch.zeros_like(real)
    Tl = streams[0].shape[-2]
    pad = -Tl % chunk_size  # a ragged last chunk: pad tokens up to the chunk
    streams = [F.pad(x, (0, 0, 0, pad)).reshape(-1, Tl + pad, d).contiguous() for x in streams]
    gates = [F.pad(g, (0, pad)).reshape(-1, Tl + pad).contiguous() for g in gates]
    real = F.pad(real.to(torch.int8), (0, pad)).reshape(-1, Tl + pad).contiguous()
    reset = F.pad(starts.to(torch.int8), (0, pad))[..., ::chunk_size].reshape(real.shape[0], -1).contiguous()

    def rows(w: Tensor) -> Tensor:
        return w.expand(*lead, d, d).reshape(-1, d, d).contiguous()

    s_in = rows(state["S_W"]) if opts.momentum else torch.zeros_like(rows(state["W"]))
    o, w, s = _LinearMemoryScan.apply(*streams, *gates, rows(init["W"]), rows(state["W"]), s_in, real, reset, opts,
                                      chunk_size)
    final = {"W": w.view(*lead, d, d)}
    if opts.momentum:
        final["S_W"] = s.view(*lead, d, d)
    if q is None:
        return None, final
    o = o.view(*lead, Tl + pad, d)[..., :Tl, :]
    return (layout.gather(o, -2) if layout is not None else o), final
