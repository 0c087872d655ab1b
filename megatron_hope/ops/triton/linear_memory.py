"""The linear (matrix) memory's scan as two Triton kernels, a forward and a backward: one program per row (batch x
head x memory), looping over the row's chunks with the state W (and momentum S) in registers.

Per token (ops/memory.py's conventions): the error e_t = 2 (W_c k_t - v_t) (target W_c v_t with self_target) at
the chunk-start state W_c, clipped to ||e_t k_t^T|| <= grad_clip; the write of token_math.write with key k_t; the
read-out W_t q_t (or W_{t-1} q_t, or W_c q_t). The rows are laid out by ops/triton/scan.py: a chunk starts every
CHUNK tokens, a document only at a chunk start (`reset`: the init, zero momentum), and pads (`real` = 0) write
nothing.

The forward keeps the state at every chunk start (O(T/C x state) per row). The backward walks the chunks last
first: it recomputes a chunk's states from its start into a per-row scratch of CHUNK states, runs the reverse
recurrence through the chunk's tokens carrying dW and dS, and adds the gradient through the chunk's errors at
the chunk start.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_hope.ops.triton import fold_rows
from megatron_hope.ops.triton.token_math import clip_backward, clip_factor, mtv, mv, outer, write, write_backward


@triton.jit
def _raw_error(w_c, k, v, SELF_TARGET: tl.constexpr):
    """2 (W_c k - target), before clipping."""
    target = v
    if SELF_TARGET:
        target = mv(w_c, v)
    return 2 * (mv(w_c, k) - target)


@triton.jit
def _tile(D: tl.constexpr, BD: tl.constexpr):
    """Offsets and masks of a (D,) vector and a row-major (D, D) matrix in (BD,) and (BD, BD) tiles."""
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    return o_d, m_d, o_d[:, None] * D + o_d[None, :], m_d[:, None] & m_d[None, :]


@triton.jit
def _forward_kernel(k_ptr, v_ptr, q_ptr, eta_ptr, la_ptr, lb_ptr, real_ptr, reset_ptr, w0_ptr, w_in_ptr, s_in_ptr,
                    o_ptr, w_out_ptr, s_out_ptr, ck_w_ptr, ck_s_ptr, n_chunks, clip, REP,
                    D: tl.constexpr, BD: tl.constexpr, CHUNK: tl.constexpr, MOMENTUM: tl.constexpr,
                    DGD: tl.constexpr, SELF_TARGET: tl.constexpr, READOUT: tl.constexpr, CLIP: tl.constexpr,
                    HAS_INIT: tl.constexpr):
    i_n = tl.program_id(0).to(tl.int64)
    o_d, m_d, o_dd, m_dd = _tile(D, BD)
    T = n_chunks * CHUNK
    p_mat = i_n * D * D + o_dd
    if HAS_INIT:
        b_w0 = tl.load(w0_ptr + p_mat, mask=m_dd, other=0.0)
    b_w = tl.load(w_in_ptr + p_mat, mask=m_dd, other=0.0)
    b_s = b_w * 0
    if MOMENTUM != 0:
        b_s = tl.load(s_in_ptr + p_mat, mask=m_dd, other=0.0)
    for i_c in range(n_chunks):
        if HAS_INIT:  # a document starts here: the init, zero momentum
            reset = tl.load(reset_ptr + i_n * n_chunks + i_c) != 0
            b_w = tl.where(reset, b_w0, b_w)
            b_s = tl.where(reset, b_s * 0, b_s)
        p_ck = (i_n * n_chunks + i_c) * D * D + o_dd
        tl.store(ck_w_ptr + p_ck, b_w, mask=m_dd)
        if MOMENTUM != 0:
            tl.store(ck_s_ptr + p_ck, b_s, mask=m_dd)
        b_wc = b_w
        for i_t in range(CHUNK):
            p_t = i_n * T + i_c * CHUNK + i_t  # this row's token: read-outs and their gradients
            p_s = (i_n // REP) * T + i_c * CHUNK + i_t  # the inputs, shared by REP rows
            b_k = tl.load(k_ptr + p_s * D + o_d, mask=m_d, other=0.0)
            b_v = tl.load(v_ptr + p_s * D + o_d, mask=m_d, other=0.0)
            b_q = tl.load(q_ptr + p_s * D + o_d, mask=m_d, other=0.0)
            real = tl.load(real_ptr + p_s) != 0
            b_e = _raw_error(b_wc, b_k, b_v, SELF_TARGET)
            if CLIP:
                b_e = b_e * clip_factor(b_e, b_k, clip)
            b_before = b_w
            b_wn, b_sn = write(b_w, b_s, b_k, b_e, tl.load(eta_ptr + p_s), tl.exp(tl.load(la_ptr + p_s)),
                               tl.exp(tl.load(lb_ptr + p_s)), MOMENTUM, DGD)
            b_w = tl.where(real, b_wn, b_w)  # pads write nothing
            b_s = tl.where(real, b_sn, b_s)
            b_read = b_w
            if READOUT == 1:
                b_read = b_before
            elif READOUT == 2:
                b_read = b_wc
            tl.store(o_ptr + p_t * D + o_d, mv(b_read, b_q), mask=m_d)
    tl.store(w_out_ptr + p_mat, b_w, mask=m_dd)
    if MOMENTUM != 0:
        tl.store(s_out_ptr + p_mat, b_s, mask=m_dd)


@triton.jit
def _backward_kernel(k_ptr, v_ptr, q_ptr, eta_ptr, la_ptr, lb_ptr, real_ptr, reset_ptr, ck_w_ptr, ck_s_ptr,
                     do_ptr, dw_out_ptr, ds_out_ptr, scr_w_ptr, scr_s_ptr,
                     dk_ptr, dv_ptr, dq_ptr, deta_ptr, dla_ptr, dlb_ptr, dw0_ptr, dw_in_ptr, ds_in_ptr,
                     n_chunks, clip, REP,
                     D: tl.constexpr, BD: tl.constexpr, CHUNK: tl.constexpr, MOMENTUM: tl.constexpr,
                     DGD: tl.constexpr, SELF_TARGET: tl.constexpr, READOUT: tl.constexpr, CLIP: tl.constexpr,
                     HAS_INIT: tl.constexpr):
    i_n = tl.program_id(0).to(tl.int64)
    o_d, m_d, o_dd, m_dd = _tile(D, BD)
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
        for i_t in range(CHUNK):  # recompute: the state and momentum before each token, into the scratch
            p_t = i_n * T + i_c * CHUNK + i_t  # this row's token: read-outs and their gradients
            p_s = (i_n // REP) * T + i_c * CHUNK + i_t  # the inputs, shared by REP rows
            tl.store(scr_w_ptr + p_scr + i_t * D * D, b_w, mask=m_dd)
            if MOMENTUM != 0:
                tl.store(scr_s_ptr + p_scr + i_t * D * D, b_s, mask=m_dd)
            b_k = tl.load(k_ptr + p_s * D + o_d, mask=m_d, other=0.0)
            b_e = _raw_error(b_wc, b_k, tl.load(v_ptr + p_s * D + o_d, mask=m_d, other=0.0), SELF_TARGET)
            if CLIP:
                b_e = b_e * clip_factor(b_e, b_k, clip)
            b_wn, b_sn = write(b_w, b_s, b_k, b_e, tl.load(eta_ptr + p_s), tl.exp(tl.load(la_ptr + p_s)),
                               tl.exp(tl.load(lb_ptr + p_s)), MOMENTUM, DGD)
            real = tl.load(real_ptr + p_s) != 0
            b_w = tl.where(real, b_wn, b_w)
            b_s = tl.where(real, b_sn, b_s)
        tl.debug_barrier()
        b_wa = b_w  # the state after the token being differentiated
        b_dwc = b_dw * 0  # gradient w.r.t. W_c through the chunk's errors (and chunk-start reads)
        for i in range(CHUNK):
            i_t = CHUNK - 1 - i
            p_t = i_n * T + i_c * CHUNK + i_t  # this row's token: read-outs and their gradients
            p_s = (i_n // REP) * T + i_c * CHUNK + i_t  # the inputs, shared by REP rows
            b_k = tl.load(k_ptr + p_s * D + o_d, mask=m_d, other=0.0)
            b_v = tl.load(v_ptr + p_s * D + o_d, mask=m_d, other=0.0)
            b_q = tl.load(q_ptr + p_s * D + o_d, mask=m_d, other=0.0)
            b_do = tl.load(do_ptr + p_t * D + o_d, mask=m_d, other=0.0)
            eta = tl.load(eta_ptr + p_s)
            real = tl.load(real_ptr + p_s) != 0
            b_wp = tl.load(scr_w_ptr + p_scr + i_t * D * D, mask=m_dd, other=0.0)
            b_sp = b_wp * 0
            if MOMENTUM != 0:
                b_sp = tl.load(scr_s_ptr + p_scr + i_t * D * D, mask=m_dd, other=0.0)
            b_er = _raw_error(b_wc, b_k, b_v, SELF_TARGET)
            b_e = b_er
            if CLIP:
                b_e = b_er * clip_factor(b_er, b_k, clip)
            if READOUT == 0:  # o = W_t q
                b_dq = mtv(b_wa, b_do)
                b_dw = b_dw + outer(b_do, b_q)
            elif READOUT == 1:  # o = W_{t-1} q: added below, after the write's backward
                b_dq = mtv(b_wp, b_do)
            else:  # o = W_c q
                b_dq = mtv(b_wc, b_do)
                b_dwc = b_dwc + outer(b_do, b_q)
            b_dwp, b_dsp, b_de, b_dk, d_eta, d_la, d_lb = write_backward(
                b_dw, b_ds, b_wp, b_sp, b_k, b_e, eta, tl.exp(tl.load(la_ptr + p_s)), tl.exp(tl.load(lb_ptr + p_s)),
                MOMENTUM, DGD)
            if CLIP:
                b_de, b_dk_clip = clip_backward(b_er, b_k, b_de, clip)
                b_dk = b_dk + b_dk_clip
            # e_raw = 2 (W_c k - target)
            b_dk = b_dk + 2 * mtv(b_wc, b_de)
            b_g_wc = outer(2 * b_de, b_k)
            if SELF_TARGET:
                b_g_wc = b_g_wc - outer(2 * b_de, b_v)
                b_dv = -2 * mtv(b_wc, b_de)
            else:
                b_dv = -2 * b_de
            b_dwc = b_dwc + tl.where(real, b_g_wc, b_g_wc * 0)  # pads: no write, no gradient
            b_dw = tl.where(real, b_dwp, b_dw)
            b_ds = tl.where(real, b_dsp, b_ds)
            if READOUT == 1:
                b_dw = b_dw + outer(b_do, b_q)
            tl.store(dk_ptr + p_t * D + o_d, tl.where(real, b_dk, b_dk * 0), mask=m_d)
            tl.store(dv_ptr + p_t * D + o_d, tl.where(real, b_dv, b_dv * 0), mask=m_d)
            tl.store(dq_ptr + p_t * D + o_d, b_dq, mask=m_d)
            tl.store(deta_ptr + p_t, tl.where(real, d_eta, d_eta * 0))
            tl.store(dla_ptr + p_t, tl.where(real, d_la, d_la * 0))
            tl.store(dlb_ptr + p_t, tl.where(real, d_lb, d_lb * 0))
            b_wa = b_wp
        tl.debug_barrier()  # the next chunk's recompute overwrites the scratch
        b_dw = b_dw + b_dwc
        if HAS_INIT:  # the chunk-start state was the init
            reset = tl.load(reset_ptr + i_n * n_chunks + i_c) != 0
            b_dw0 = b_dw0 + tl.where(reset, b_dw, b_dw * 0)
            b_dw = tl.where(reset, b_dw * 0, b_dw)
            b_ds = tl.where(reset, b_ds * 0, b_ds)
    if HAS_INIT:
        tl.store(dw0_ptr + p_mat, b_dw0, mask=m_dd)
    tl.store(dw_in_ptr + p_mat, b_dw, mask=m_dd)
    if MOMENTUM != 0:
        tl.store(ds_in_ptr + p_mat, b_ds, mask=m_dd)


class LinearMemoryScan(torch.autograd.Function):
    """Rows flattened and laid out (ops/triton/scan.py): w_in, s_in (N, d, d) and w0 (the same, or None: no document
    starts); k, v, q (N / rep, T', d), T' a multiple of the chunk, gates (N / rep, T') and real (N / rep, T') int8,
    each row shared by `rep` consecutive state rows; reset (N, T'/C) int8, or None with w0. Returns the read-outs (N, T', d) and
    the final state and momentum (N, d, d). `constants`: the kernels' compile-time switches."""

    @staticmethod
    def forward(ctx, k, v, q, eta, log_alpha, log_beta, w0, w_in, s_in, real, reset, clip, rep, constants):
        N, (T, d) = w_in.shape[0], k.shape[1:]
        n_chunks = T // constants["CHUNK"]
        momentum = constants["MOMENTUM"] != 0
        o = k.new_empty(N, T, d)
        w_out, s_out = torch.empty_like(w_in), torch.empty_like(s_in)
        ck_w = k.new_empty(N, n_chunks, d, d)
        ck_s = torch.empty_like(ck_w) if momentum else ck_w
        _forward_kernel[(N,)](k, v, q, eta, log_alpha, log_beta, real, real if reset is None else reset,
                              w_in if w0 is None else w0, w_in, s_in,
                              o, w_out, s_out, ck_w, ck_s, n_chunks, clip, rep, D=d, BD=triton.next_power_of_2(d),
                              HAS_INIT=w0 is not None, **constants)
        ctx.save_for_backward(k, v, q, eta, log_alpha, log_beta, real, reset, ck_w, ck_s)
        ctx.clip, ctx.rep, ctx.has_init, ctx.constants = clip, rep, w0 is not None, constants
        if not momentum:
            ctx.mark_non_differentiable(s_out)
        return o, w_out, s_out

    @staticmethod
    def backward(ctx, d_o, d_w, d_s):
        k, v, q, eta, log_alpha, log_beta, real, reset, ck_w, ck_s = ctx.saved_tensors
        constants, rep = ctx.constants, ctx.rep
        N, (T, d) = ck_w.shape[0], k.shape[1:]
        momentum = constants["MOMENTUM"] != 0
        zeros = k.new_zeros(N, d, d)
        d_o = k.new_zeros(N, T, d) if d_o is None else d_o.contiguous()
        d_w = zeros if d_w is None else d_w.contiguous()
        d_s = zeros if d_s is None or not momentum else d_s.contiguous()
        scratch_w = k.new_empty(N, constants["CHUNK"], d, d)
        scratch_s = torch.empty_like(scratch_w) if momentum else scratch_w
        dk, dv, dq = (k.new_empty(N, T, d) for _ in range(3))
        d_eta, d_la, d_lb = (eta.new_empty(N, T) for _ in range(3))
        d_w0 = torch.empty_like(zeros) if ctx.has_init else zeros
        d_w_in, d_s_in = torch.empty_like(zeros), torch.zeros_like(zeros)
        _backward_kernel[(N,)](k, v, q, eta, log_alpha, log_beta, real, real if reset is None else reset, ck_w, ck_s,
                               d_o, d_w, d_s,
                               scratch_w, scratch_s, dk, dv, dq, d_eta, d_la, d_lb, d_w0, d_w_in, d_s_in,
                               T // constants["CHUNK"], ctx.clip, rep, D=d, BD=triton.next_power_of_2(d),
                               HAS_INIT=ctx.has_init, **constants)
        return (*(fold_rows(g, rep) for g in (dk, dv, dq, d_eta, d_la, d_lb)), d_w0 if ctx.has_init else None,
                d_w_in, d_s_in, None, None, None, None, None)
