"""The residual MLP memory's scan, M(z) = z + A act(B z) with A (w x m) and B (m x w), as two Triton kernels
laid out like linear_memory.py's (one program per row looping over chunks; chunk-start states kept; chunks
recomputed in the backward into a per-row scratch).

Per token, at the chunk-start point (A_c, B_c) (ops/memory.py's `_errors`): p = B_c k, h = act(p),
e_A = 2 (k + A_c h - target) with target v or M_c(v) (self_target), e_B = act'(p) o (A_c^T e_A); each clipped
to ||e h^T||, ||e_B k^T|| <= grad_clip. A is written with key h and error e_A (the DGD factor with dgd = "each"),
B with key k and error e_B (the DGD factor unless dgd = "none"), both by token_math.write. The read-out is
q + A act(B q) at the state after the write (or before it, or at the chunk start). The backward differentiates
the errors through the activation twice (act'' where e_B carries act'(p)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_hope.ops.triton import fold_rows
from megatron_hope.ops.triton.token_math import (act, act_grad, act_grad2, clip_backward, clip_factor, mlp_tiles,
                                                 mtv, mv, outer, write, write_backward)


@triton.jit
def _raw_errors(a_c, b_c, k, v, SELF_TARGET: tl.constexpr, ACT: tl.constexpr):
    """The inner gradient's factors at the chunk start, before clipping: e_A, e_B, the key h and p = B_c k."""
    p = mv(b_c, k)
    h = act(p, ACT)
    target = v
    if SELF_TARGET:
        target = v + mv(a_c, act(mv(b_c, v), ACT))
    e_a = 2 * (k + mv(a_c, h) - target)
    return e_a, act_grad(p, ACT) * mtv(a_c, e_a), h, p


@triton.jit
def _read(a, b, q, ACT: tl.constexpr):
    return q + mv(a, act(mv(b, q), ACT))


@triton.jit
def _token_write(a, b, sa, sb, a_c, b_c, k, v, eta, alpha, beta, clip, MOMENTUM: tl.constexpr,
                 DGD_A: tl.constexpr, DGD_B: tl.constexpr, SELF_TARGET: tl.constexpr, CLIP: tl.constexpr,
                 ACT: tl.constexpr):
    e_a, e_b, h, p = _raw_errors(a_c, b_c, k, v, SELF_TARGET, ACT)
    if CLIP:
        e_a = e_a * clip_factor(e_a, h, clip)
        e_b = e_b * clip_factor(e_b, k, clip)
    a_new, sa_new = write(a, sa, h, e_a, eta, alpha, beta, MOMENTUM, DGD_A)
    b_new, sb_new = write(b, sb, k, e_b, eta, alpha, beta, MOMENTUM, DGD_B)
    return a_new, b_new, sa_new, sb_new


@triton.jit
def _forward_kernel(k_ptr, v_ptr, q_ptr, eta_ptr, la_ptr, lb_ptr, real_ptr, reset_ptr, a0_ptr, b0_ptr,
                    a_in_ptr, b_in_ptr, sa_in_ptr, sb_in_ptr, o_ptr, a_out_ptr, b_out_ptr, sa_out_ptr, sb_out_ptr,
                    ck_a_ptr, ck_b_ptr, ck_sa_ptr, ck_sb_ptr, n_chunks, clip, REP,
                    W: tl.constexpr, M: tl.constexpr, BW: tl.constexpr, BM: tl.constexpr, CHUNK: tl.constexpr,
                    MOMENTUM: tl.constexpr, DGD_A: tl.constexpr, DGD_B: tl.constexpr, SELF_TARGET: tl.constexpr,
                    READOUT: tl.constexpr, CLIP: tl.constexpr, ACT: tl.constexpr, HAS_INIT: tl.constexpr):
    i_n = tl.program_id(0).to(tl.int64)
    o_w, m_w, o_a, m_a, o_b, m_b = mlp_tiles(W, M, BW, BM)
    T = n_chunks * CHUNK
    p_mat = i_n * W * M
    if HAS_INIT:
        b_a0 = tl.load(a0_ptr + p_mat + o_a, mask=m_a, other=0.0)
        b_b0 = tl.load(b0_ptr + p_mat + o_b, mask=m_b, other=0.0)
    b_a = tl.load(a_in_ptr + p_mat + o_a, mask=m_a, other=0.0)
    b_b = tl.load(b_in_ptr + p_mat + o_b, mask=m_b, other=0.0)
    b_sa, b_sb = b_a * 0, b_b * 0
    if MOMENTUM != 0:
        b_sa = tl.load(sa_in_ptr + p_mat + o_a, mask=m_a, other=0.0)
        b_sb = tl.load(sb_in_ptr + p_mat + o_b, mask=m_b, other=0.0)
    for i_c in range(n_chunks):
        if HAS_INIT:  # a document starts here: the init, zero momentum
            reset = tl.load(reset_ptr + i_n * n_chunks + i_c) != 0
            b_a = tl.where(reset, b_a0, b_a)
            b_b = tl.where(reset, b_b0, b_b)
            b_sa = tl.where(reset, b_sa * 0, b_sa)
            b_sb = tl.where(reset, b_sb * 0, b_sb)
        p_ck = (i_n * n_chunks + i_c) * W * M
        tl.store(ck_a_ptr + p_ck + o_a, b_a, mask=m_a)
        tl.store(ck_b_ptr + p_ck + o_b, b_b, mask=m_b)
        if MOMENTUM != 0:
            tl.store(ck_sa_ptr + p_ck + o_a, b_sa, mask=m_a)
            tl.store(ck_sb_ptr + p_ck + o_b, b_sb, mask=m_b)
        b_ac, b_bc = b_a, b_b
        for i_t in range(CHUNK):
            p_t = i_n * T + i_c * CHUNK + i_t  # this row's token: read-outs and their gradients
            p_s = (i_n // REP) * T + i_c * CHUNK + i_t  # the inputs, shared by REP rows
            b_k = tl.load(k_ptr + p_s * W + o_w, mask=m_w, other=0.0)
            b_v = tl.load(v_ptr + p_s * W + o_w, mask=m_w, other=0.0)
            b_q = tl.load(q_ptr + p_s * W + o_w, mask=m_w, other=0.0)
            real = tl.load(real_ptr + p_s) != 0
            b_a_before, b_b_before = b_a, b_b
            a_new, b_new, sa_new, sb_new = _token_write(
                b_a, b_b, b_sa, b_sb, b_ac, b_bc, b_k, b_v, tl.load(eta_ptr + p_s), tl.exp(tl.load(la_ptr + p_s)),
                tl.exp(tl.load(lb_ptr + p_s)), clip, MOMENTUM, DGD_A, DGD_B, SELF_TARGET, CLIP, ACT)
            b_a = tl.where(real, a_new, b_a)  # pads write nothing
            b_b = tl.where(real, b_new, b_b)
            b_sa = tl.where(real, sa_new, b_sa)
            b_sb = tl.where(real, sb_new, b_sb)
            if READOUT == 0:
                b_o = _read(b_a, b_b, b_q, ACT)
            elif READOUT == 1:
                b_o = _read(b_a_before, b_b_before, b_q, ACT)
            else:
                b_o = _read(b_ac, b_bc, b_q, ACT)
            tl.store(o_ptr + p_t * W + o_w, b_o, mask=m_w)
    tl.store(a_out_ptr + p_mat + o_a, b_a, mask=m_a)
    tl.store(b_out_ptr + p_mat + o_b, b_b, mask=m_b)
    if MOMENTUM != 0:
        tl.store(sa_out_ptr + p_mat + o_a, b_sa, mask=m_a)
        tl.store(sb_out_ptr + p_mat + o_b, b_sb, mask=m_b)


@triton.jit
def _read_backward(a, b, q, do, ACT: tl.constexpr):
    """Gradients of q + A act(B q) w.r.t. A, B and q."""
    u = mv(b, q)
    du = act_grad(u, ACT) * mtv(a, do)
    return outer(do, act(u, ACT)), outer(du, q), do + mtv(b, du)


@triton.jit
def _backward_kernel(k_ptr, v_ptr, q_ptr, eta_ptr, la_ptr, lb_ptr, real_ptr, reset_ptr,
                     ck_a_ptr, ck_b_ptr, ck_sa_ptr, ck_sb_ptr, do_ptr, da_out_ptr, db_out_ptr, dsa_out_ptr,
                     dsb_out_ptr, scr_a_ptr, scr_b_ptr, scr_sa_ptr, scr_sb_ptr,
                     dk_ptr, dv_ptr, dq_ptr, deta_ptr, dla_ptr, dlb_ptr, da0_ptr, db0_ptr, da_in_ptr, db_in_ptr,
                     dsa_in_ptr, dsb_in_ptr, n_chunks, clip, REP,
                     W: tl.constexpr, M: tl.constexpr, BW: tl.constexpr, BM: tl.constexpr, CHUNK: tl.constexpr,
                     MOMENTUM: tl.constexpr, DGD_A: tl.constexpr, DGD_B: tl.constexpr, SELF_TARGET: tl.constexpr,
                     READOUT: tl.constexpr, CLIP: tl.constexpr, ACT: tl.constexpr, HAS_INIT: tl.constexpr):
    i_n = tl.program_id(0).to(tl.int64)
    o_w, m_w, o_a, m_a, o_b, m_b = mlp_tiles(W, M, BW, BM)
    T = n_chunks * CHUNK
    p_mat = i_n * W * M
    p_scr = i_n * CHUNK * W * M
    b_da = tl.load(da_out_ptr + p_mat + o_a, mask=m_a, other=0.0)  # gradients w.r.t. the state between tokens
    b_db = tl.load(db_out_ptr + p_mat + o_b, mask=m_b, other=0.0)
    b_dsa, b_dsb = b_da * 0, b_db * 0
    if MOMENTUM != 0:
        b_dsa = tl.load(dsa_out_ptr + p_mat + o_a, mask=m_a, other=0.0)
        b_dsb = tl.load(dsb_out_ptr + p_mat + o_b, mask=m_b, other=0.0)
    b_da0, b_db0 = b_da * 0, b_db * 0
    for j in range(n_chunks):
        i_c = n_chunks - 1 - j
        p_ck = (i_n * n_chunks + i_c) * W * M
        b_ac = tl.load(ck_a_ptr + p_ck + o_a, mask=m_a, other=0.0)
        b_bc = tl.load(ck_b_ptr + p_ck + o_b, mask=m_b, other=0.0)
        b_a, b_b = b_ac, b_bc
        b_sa, b_sb = b_ac * 0, b_bc * 0
        if MOMENTUM != 0:
            b_sa = tl.load(ck_sa_ptr + p_ck + o_a, mask=m_a, other=0.0)
            b_sb = tl.load(ck_sb_ptr + p_ck + o_b, mask=m_b, other=0.0)
        for i_t in range(CHUNK):  # recompute: the states before each token, into the scratch
            p_t = i_n * T + i_c * CHUNK + i_t  # this row's token: read-outs and their gradients
            p_s = (i_n // REP) * T + i_c * CHUNK + i_t  # the inputs, shared by REP rows
            p_z = p_scr + i_t * W * M  # this token's slot in the scratch
            tl.store(scr_a_ptr + p_z + o_a, b_a, mask=m_a)
            tl.store(scr_b_ptr + p_z + o_b, b_b, mask=m_b)
            if MOMENTUM != 0:
                tl.store(scr_sa_ptr + p_z + o_a, b_sa, mask=m_a)
                tl.store(scr_sb_ptr + p_z + o_b, b_sb, mask=m_b)
            a_new, b_new, sa_new, sb_new = _token_write(
                b_a, b_b, b_sa, b_sb, b_ac, b_bc, tl.load(k_ptr + p_s * W + o_w, mask=m_w, other=0.0),
                tl.load(v_ptr + p_s * W + o_w, mask=m_w, other=0.0), tl.load(eta_ptr + p_s),
                tl.exp(tl.load(la_ptr + p_s)), tl.exp(tl.load(lb_ptr + p_s)), clip, MOMENTUM, DGD_A, DGD_B,
                SELF_TARGET, CLIP, ACT)
            real = tl.load(real_ptr + p_s) != 0
            b_a = tl.where(real, a_new, b_a)
            b_b = tl.where(real, b_new, b_b)
            b_sa = tl.where(real, sa_new, b_sa)
            b_sb = tl.where(real, sb_new, b_sb)
        tl.debug_barrier()
        b_aa, b_ba = b_a, b_b  # the state after the token being differentiated
        b_dac, b_dbc = b_da * 0, b_db * 0  # gradients w.r.t. the chunk-start point (errors, chunk-start reads)
        for i in range(CHUNK):
            i_t = CHUNK - 1 - i
            p_t = i_n * T + i_c * CHUNK + i_t  # this row's token: read-outs and their gradients
            p_s = (i_n // REP) * T + i_c * CHUNK + i_t  # the inputs, shared by REP rows
            p_z = p_scr + i_t * W * M  # this token's slot in the scratch
            b_k = tl.load(k_ptr + p_s * W + o_w, mask=m_w, other=0.0)
            b_v = tl.load(v_ptr + p_s * W + o_w, mask=m_w, other=0.0)
            b_q = tl.load(q_ptr + p_s * W + o_w, mask=m_w, other=0.0)
            b_do = tl.load(do_ptr + p_t * W + o_w, mask=m_w, other=0.0)
            eta = tl.load(eta_ptr + p_s)
            alpha = tl.exp(tl.load(la_ptr + p_s))
            beta = tl.exp(tl.load(lb_ptr + p_s))
            real = tl.load(real_ptr + p_s) != 0
            b_ap = tl.load(scr_a_ptr + p_z + o_a, mask=m_a, other=0.0)
            b_bp = tl.load(scr_b_ptr + p_z + o_b, mask=m_b, other=0.0)
            b_sap, b_sbp = b_ap * 0, b_bp * 0
            if MOMENTUM != 0:
                b_sap = tl.load(scr_sa_ptr + p_z + o_a, mask=m_a, other=0.0)
                b_sbp = tl.load(scr_sb_ptr + p_z + o_b, mask=m_b, other=0.0)
            # the read-out, at the state after the write, before it, or at the chunk start
            if READOUT == 0:
                g_a, g_b, b_dq = _read_backward(b_aa, b_ba, b_q, b_do, ACT)
                b_da, b_db = b_da + g_a, b_db + g_b
            elif READOUT == 1:
                g_a, g_b, b_dq = _read_backward(b_ap, b_bp, b_q, b_do, ACT)
            else:
                g_a, g_b, b_dq = _read_backward(b_ac, b_bc, b_q, b_do, ACT)
                b_dac, b_dbc = b_dac + g_a, b_dbc + g_b
            # the writes of A (key h, error e_A) and B (key k, error e_B)
            e_a_raw, e_b_raw, b_h, b_p = _raw_errors(b_ac, b_bc, b_k, b_v, SELF_TARGET, ACT)
            e_a, e_b = e_a_raw, e_b_raw
            if CLIP:
                e_a = e_a_raw * clip_factor(e_a_raw, b_h, clip)
                e_b = e_b_raw * clip_factor(e_b_raw, b_k, clip)
            d_ap, d_sap, d_ea, d_h, d_eta, d_la, d_lb = write_backward(b_da, b_dsa, b_ap, b_sap, b_h, e_a, eta, alpha,
                                                                       beta, MOMENTUM, DGD_A)
            d_bp, d_sbp, d_eb, d_k, d_eta_b, d_la_b, d_lb_b = write_backward(b_db, b_dsb, b_bp, b_sbp, b_k, e_b, eta,
                                                                             alpha, beta, MOMENTUM, DGD_B)
            d_eta, d_la, d_lb = d_eta + d_eta_b, d_la + d_la_b, d_lb + d_lb_b
            if CLIP:
                d_ea, d_h_clip = clip_backward(e_a_raw, b_h, d_ea, clip)
                d_eb, d_k_clip = clip_backward(e_b_raw, b_k, d_eb, clip)
                d_h, d_k = d_h + d_h_clip, d_k + d_k_clip
            # e_B = act'(p) o r with r = A_c^T e_A
            r = mtv(b_ac, e_a_raw)
            d_r = act_grad(b_p, ACT) * d_eb
            d_p = act_grad2(b_p, ACT) * r * d_eb
            g_ac = outer(e_a_raw, d_r)
            d_ea = d_ea + mv(b_ac, d_r)
            # e_A = 2 (k + A_c h - target), h = act(p), p = B_c k
            d_k = d_k + 2 * d_ea
            g_ac = g_ac + outer(2 * d_ea, b_h)
            d_h = d_h + 2 * mtv(b_ac, d_ea)
            d_p = d_p + act_grad(b_p, ACT) * d_h
            g_bc = outer(d_p, b_k)
            d_k = d_k + mtv(b_bc, d_p)
            b_dv = -2 * d_ea
            if SELF_TARGET:  # target = v + A_c act(B_c v)
                pv = mv(b_bc, b_v)
                g_ac = g_ac + outer(-2 * d_ea, act(pv, ACT))
                d_pv = act_grad(pv, ACT) * mtv(b_ac, -2 * d_ea)
                g_bc = g_bc + outer(d_pv, b_v)
                b_dv = b_dv + mtv(b_bc, d_pv)
            b_dac = b_dac + tl.where(real, g_ac, g_ac * 0)  # pads: no write, no gradient
            b_dbc = b_dbc + tl.where(real, g_bc, g_bc * 0)
            b_da = tl.where(real, d_ap, b_da)
            b_db = tl.where(real, d_bp, b_db)
            b_dsa = tl.where(real, d_sap, b_dsa)
            b_dsb = tl.where(real, d_sbp, b_dsb)
            if READOUT == 1:
                b_da, b_db = b_da + g_a, b_db + g_b
            tl.store(dk_ptr + p_t * W + o_w, tl.where(real, d_k, d_k * 0), mask=m_w)
            tl.store(dv_ptr + p_t * W + o_w, tl.where(real, b_dv, b_dv * 0), mask=m_w)
            tl.store(dq_ptr + p_t * W + o_w, b_dq, mask=m_w)
            tl.store(deta_ptr + p_t, tl.where(real, d_eta, d_eta * 0))
            tl.store(dla_ptr + p_t, tl.where(real, d_la, d_la * 0))
            tl.store(dlb_ptr + p_t, tl.where(real, d_lb, d_lb * 0))
            b_aa, b_ba = b_ap, b_bp
        tl.debug_barrier()  # the next chunk's recompute overwrites the scratch
        b_da, b_db = b_da + b_dac, b_db + b_dbc
        if HAS_INIT:  # the chunk-start state was the init
            reset = tl.load(reset_ptr + i_n * n_chunks + i_c) != 0
            b_da0 = b_da0 + tl.where(reset, b_da, b_da * 0)
            b_db0 = b_db0 + tl.where(reset, b_db, b_db * 0)
            b_da = tl.where(reset, b_da * 0, b_da)
            b_db = tl.where(reset, b_db * 0, b_db)
            b_dsa = tl.where(reset, b_dsa * 0, b_dsa)
            b_dsb = tl.where(reset, b_dsb * 0, b_dsb)
    if HAS_INIT:
        tl.store(da0_ptr + p_mat + o_a, b_da0, mask=m_a)
        tl.store(db0_ptr + p_mat + o_b, b_db0, mask=m_b)
    tl.store(da_in_ptr + p_mat + o_a, b_da, mask=m_a)
    tl.store(db_in_ptr + p_mat + o_b, b_db, mask=m_b)
    if MOMENTUM != 0:
        tl.store(dsa_in_ptr + p_mat + o_a, b_dsa, mask=m_a)
        tl.store(dsb_in_ptr + p_mat + o_b, b_dsb, mask=m_b)


class MLPMemoryScan(torch.autograd.Function):
    """Rows flattened and laid out (ops/triton/scan.py): a_in, sa_in (N, w, m), b_in, sb_in (N, m, w) and the inits
    a0, b0 (the same, or None: no document starts); k, v, q (N / rep, T', w), gates and real (N / rep, T'), each
    row shared by `rep` consecutive state rows; reset (N, T'/C) int8, or None with the inits. Returns the read-outs (N, T', w) and the
    final A, B and their momenta."""

    @staticmethod
    def forward(ctx, k, v, q, eta, log_alpha, log_beta, a0, b0, a_in, b_in, sa_in, sb_in, real, reset, clip, rep,
                constants):
        N, (T, w), m = a_in.shape[0], k.shape[1:], a_in.shape[-1]
        n_chunks = T // constants["CHUNK"]
        momentum = constants["MOMENTUM"] != 0
        has_init = a0 is not None
        o = k.new_empty(N, T, w)
        outs = [torch.empty_like(x) for x in (a_in, b_in, sa_in, sb_in)]
        ck = [k.new_empty(N, n_chunks, *x.shape[1:]) for x in (a_in, b_in)]
        ck += [torch.empty_like(c) for c in ck] if momentum else ck
        _forward_kernel[(N,)](k, v, q, eta, log_alpha, log_beta, real, real if reset is None else reset,
                              a0 if has_init else a_in,
                              b0 if has_init else b_in, a_in, b_in, sa_in, sb_in, o, *outs, *ck, n_chunks, clip, rep,
                              **_sizes(w, m), HAS_INIT=has_init, **constants)
        ctx.save_for_backward(k, v, q, eta, log_alpha, log_beta, real, reset, *ck)
        ctx.clip, ctx.rep, ctx.has_init, ctx.constants, ctx.m = clip, rep, has_init, constants, m
        if not momentum:
            ctx.mark_non_differentiable(*outs[2:])
        return o, *outs

    @staticmethod
    def backward(ctx, d_o, *d_states):
        k, v, q, eta, log_alpha, log_beta, real, reset, *ck = ctx.saved_tensors
        constants, m, rep = ctx.constants, ctx.m, ctx.rep
        N, (T, w) = ck[0].shape[0], k.shape[1:]
        momentum = constants["MOMENTUM"] != 0
        shapes = ((N, w, m), (N, m, w), (N, w, m), (N, m, w))
        d_o = k.new_zeros(N, T, w) if d_o is None else d_o.contiguous()
        d_states = [k.new_zeros(s) if d is None or (i >= 2 and not momentum) else d.contiguous()
                    for i, (d, s) in enumerate(zip(d_states, shapes))]
        scratch = [k.new_empty(N, constants["CHUNK"], *s[1:]) for s in shapes[:2]]
        scratch += [torch.empty_like(s) for s in scratch] if momentum else scratch
        dk, dv, dq = (k.new_empty(N, T, w) for _ in range(3))
        d_gates = [eta.new_empty(N, T) for _ in range(3)]
        d_inits = [k.new_empty(s) for s in shapes[:2]] if ctx.has_init else d_states[:2]
        d_ins = [k.new_empty(s) for s in shapes[:2]] + [k.new_zeros(s) for s in shapes[2:]]
        _backward_kernel[(N,)](k, v, q, eta, log_alpha, log_beta, real, real if reset is None else reset, *ck, d_o,
                               *d_states, *scratch,
                               dk, dv, dq, *d_gates, *d_inits, *d_ins, T // constants["CHUNK"], ctx.clip, rep,
                               **_sizes(w, m), HAS_INIT=ctx.has_init, **constants)
        return (*(fold_rows(g, rep) for g in (dk, dv, dq, *d_gates)), *(d_inits if ctx.has_init else (None, None)),
                *d_ins, None, None, None, None, None)


def _sizes(w: int, m: int) -> dict:
    return dict(W=w, M=m, BW=triton.next_power_of_2(w), BM=triton.next_power_of_2(m))
