"""HOPE's generator reads for one chunk as a Triton kernel pair (MLP memories; ops/self_modifying._generated):
at the chunk-start state, each generator memory g maps its inputs x_g to gen_g = x_g + A_g act(B_g x_g), and

    k = gen_k / ||gen_k||,  v = gen_v,  eta = eta_max sigmoid(<gen_eta, r_eta> + b_eta),
    log alpha = log sigmoid(<gen_alpha, r_alpha> + b_alpha),  q = normalize(gen_q or the static query).

One program per (sequence, head) visits the generators one at a time (a generator's A and B in registers) and
the chunk's tokens one at a time. The backward recomputes the reads and accumulates the gradients of the
generators' A and B, their inputs, the static queries and the readouts (per sequence; summed over the batch by
the caller).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_hope.ops.triton.token_math import GELU, SILU, act, act_grad, mlp_tiles, mtv, mv, outer


@triton.jit
def _normalize(x):
    """x / max(||x||, 1e-12) (F.normalize)."""
    return x / tl.maximum(tl.sqrt(tl.sum(x * x)), 1e-12)


@triton.jit
def _normalize_backward(x, dy):
    """Gradient of x / max(||x||, 1e-12) (F.normalize)."""
    norm = tl.sqrt(tl.sum(x * x))
    n = tl.maximum(norm, 1e-12)
    y = x / n
    return tl.where(norm > 1e-12, (dy - y * tl.sum(y * dy)) / n, dy / n)


@triton.jit
def _readouts(re_ptr, be_ptr, ra_ptr, ba_ptr, i_h, o_w, m_w, W: tl.constexpr):
    """Head i_h's gate readouts: r_eta, b_eta, r_alpha, b_alpha."""
    return (tl.load(re_ptr + i_h * W + o_w, mask=m_w, other=0.0), tl.load(be_ptr + i_h),
            tl.load(ra_ptr + i_h * W + o_w, mask=m_w, other=0.0), tl.load(ba_ptr + i_h))


@triton.jit
def _forward_kernel(x_ptr, q_ptr, a_ptr, b_ptr, re_ptr, be_ptr, ra_ptr, ba_ptr, k_ptr, v_ptr, eta_ptr, la_ptr, qo_ptr,
                    H, eta_max, W: tl.constexpr, M: tl.constexpr, BW: tl.constexpr, BM: tl.constexpr,
                    L: tl.constexpr, G: tl.constexpr, ADAPTIVE_Q: tl.constexpr, ACT: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    o_w, m_w, o_a, m_a, o_b, m_b = mlp_tiles(W, M, BW, BM)
    b_re, bias_e, b_ra, bias_a = _readouts(re_ptr, be_ptr, ra_ptr, ba_ptr, i_bh % H, o_w, m_w, W)
    for g in tl.static_range(G):
        p_mem = (i_bh * (G + 1) + g) * W * M  # the state holds the G generators, then the main memory
        b_a = tl.load(a_ptr + p_mem + o_a, mask=m_a, other=0.0)
        b_b = tl.load(b_ptr + p_mem + o_b, mask=m_b, other=0.0)
        for i_t in range(L):
            b_x = tl.load(x_ptr + ((i_bh * G + g) * L + i_t) * W + o_w, mask=m_w, other=0.0)
            gen = b_x + mv(b_a, act(mv(b_b, b_x), ACT))
            p_t = i_bh * L + i_t
            if g == 0:
                tl.store(k_ptr + p_t * W + o_w, _normalize(gen), mask=m_w)
            elif g == 1:
                tl.store(v_ptr + p_t * W + o_w, gen, mask=m_w)
            elif g == 2:
                tl.store(eta_ptr + p_t, eta_max * tl.sigmoid(tl.sum(gen * b_re) + bias_e))
            elif g == 3:
                z = tl.sum(gen * b_ra) + bias_a
                tl.store(la_ptr + p_t, tl.minimum(z, 0.0) - tl.log(1 + tl.exp(-tl.abs(z))))  # log sigmoid(z)
            else:
                tl.store(qo_ptr + p_t * W + o_w, _normalize(gen), mask=m_w)
    if not ADAPTIVE_Q:
        for i_t in range(L):
            p_t = i_bh * L + i_t
            b_q = tl.load(q_ptr + p_t * W + o_w, mask=m_w, other=0.0)
            tl.store(qo_ptr + p_t * W + o_w, _normalize(b_q), mask=m_w)


@triton.jit
def _backward_kernel(x_ptr, q_ptr, a_ptr, b_ptr, re_ptr, be_ptr, ra_ptr, ba_ptr,
                     dk_ptr, dv_ptr, deta_ptr, dla_ptr, dqo_ptr,
                     dx_ptr, dq_ptr, da_ptr, db_ptr, dre_ptr, dbe_ptr, dra_ptr, dba_ptr,
                     H, eta_max, W: tl.constexpr, M: tl.constexpr, BW: tl.constexpr, BM: tl.constexpr,
                     L: tl.constexpr, G: tl.constexpr, ADAPTIVE_Q: tl.constexpr, ACT: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    o_w, m_w, o_a, m_a, o_b, m_b = mlp_tiles(W, M, BW, BM)
    b_re, bias_e, b_ra, bias_a = _readouts(re_ptr, be_ptr, ra_ptr, ba_ptr, i_bh % H, o_w, m_w, W)
    b_dre, b_dra = b_re * 0, b_ra * 0
    d_be, d_ba = tl.sum(b_re * 0), tl.sum(b_ra * 0)
    for g in tl.static_range(G):
        p_mem = (i_bh * (G + 1) + g) * W * M
        b_a = tl.load(a_ptr + p_mem + o_a, mask=m_a, other=0.0)
        b_b = tl.load(b_ptr + p_mem + o_b, mask=m_b, other=0.0)
        b_da, b_db = b_a * 0, b_b * 0
        for i_t in range(L):
            p_x = ((i_bh * G + g) * L + i_t) * W
            p_t = i_bh * L + i_t
            b_x = tl.load(x_ptr + p_x + o_w, mask=m_w, other=0.0)
            pre = mv(b_b, b_x)
            hid = act(pre, ACT)
            gen = b_x + mv(b_a, hid)
            if g == 0:
                d_gen = _normalize_backward(gen, tl.load(dk_ptr + p_t * W + o_w, mask=m_w, other=0.0))
            elif g == 1:
                d_gen = tl.load(dv_ptr + p_t * W + o_w, mask=m_w, other=0.0)
            elif g == 2:
                s = tl.sigmoid(tl.sum(gen * b_re) + bias_e)
                d_z = tl.load(deta_ptr + p_t) * eta_max * s * (1 - s)
                d_gen = d_z * b_re
                b_dre = b_dre + d_z * gen
                d_be = d_be + d_z
            elif g == 3:
                d_z = tl.load(dla_ptr + p_t) * tl.sigmoid(-(tl.sum(gen * b_ra) + bias_a))
                d_gen = d_z * b_ra
                b_dra = b_dra + d_z * gen
                d_ba = d_ba + d_z
            else:
                d_gen = _normalize_backward(gen, tl.load(dqo_ptr + p_t * W + o_w, mask=m_w, other=0.0))
            # gen = x + A act(B x)
            b_da = b_da + outer(d_gen, hid)
            d_pre = act_grad(pre, ACT) * mtv(b_a, d_gen)
            b_db = b_db + outer(d_pre, b_x)
            tl.store(dx_ptr + p_x + o_w, d_gen + mtv(b_b, d_pre), mask=m_w)
        tl.store(da_ptr + p_mem + o_a, b_da, mask=m_a)
        tl.store(db_ptr + p_mem + o_b, b_db, mask=m_b)
    if not ADAPTIVE_Q:
        for i_t in range(L):
            p_t = i_bh * L + i_t
            b_q = tl.load(q_ptr + p_t * W + o_w, mask=m_w, other=0.0)
            tl.store(dq_ptr + p_t * W + o_w,
                     _normalize_backward(b_q, tl.load(dqo_ptr + p_t * W + o_w, mask=m_w, other=0.0)), mask=m_w)
    tl.store(dre_ptr + i_bh * W + o_w, b_dre, mask=m_w)
    tl.store(dra_ptr + i_bh * W + o_w, b_dra, mask=m_w)
    tl.store(dbe_ptr + i_bh, d_be)
    tl.store(dba_ptr + i_bh, d_ba)


class GeneratorReads(torch.autograd.Function):
    """x (B, H, G, L, w) generator inputs; q (B, H, L, w) static queries (unused with adaptive q); A (B, H, G+1, w, m)
    and B (B, H, G+1, m, w) the chunk-start state (generators first); readouts r_eta, r_alpha (H, w), biases (H,).
    Returns k, v (B, H, L, w), eta, log alpha (B, H, L), q (B, H, L, w)."""

    @staticmethod
    def forward(ctx, x, q, A, B, r_eta, b_eta, r_alpha, b_alpha, eta_max, act_code):
        Bn, H, G, L, w = x.shape
        m = A.shape[-1]
        adaptive_q = q is None  # q from the last generator; the kernel reads no static query
        x, A, B = x.contiguous(), A.contiguous(), B.contiguous()
        q = x if adaptive_q else q.contiguous()
        k, v, q_out = (x.new_empty(Bn, H, L, w) for _ in range(3))
        eta, log_alpha = x.new_empty(Bn, H, L), x.new_empty(Bn, H, L)
        meta = dict(W=w, M=m, BW=triton.next_power_of_2(w), BM=triton.next_power_of_2(m), L=L, G=G,
                    ADAPTIVE_Q=adaptive_q, ACT=act_code)
        _forward_kernel[(Bn * H,)](x, q, A, B, r_eta, b_eta, r_alpha, b_alpha, k, v, eta, log_alpha, q_out, H,
                                   eta_max, **meta)
        ctx.save_for_backward(x, q, A, B, r_eta, b_eta, r_alpha, b_alpha)
        ctx.eta_max, ctx.meta = eta_max, meta
        return k, v, eta, log_alpha, q_out

    @staticmethod
    def backward(ctx, dk, dv, d_eta, d_la, dq_out):
        x, q, A, B, r_eta, b_eta, r_alpha, b_alpha = ctx.saved_tensors
        Bn, H, G, L, w = x.shape
        grads = [x.new_zeros(Bn, H, L, *size) if d is None else d.contiguous()
                 for d, size in ((dk, (w,)), (dv, (w,)), (d_eta, ()), (d_la, ()), (dq_out, (w,)))]
        dx, dq = torch.empty_like(x), torch.empty_like(q)
        dA, dB = torch.zeros_like(A), torch.zeros_like(B)  # the main memory (last) gets none from the reads
        d_re, d_ra = x.new_empty(Bn, H, w), x.new_empty(Bn, H, w)
        d_be, d_ba = x.new_empty(Bn, H), x.new_empty(Bn, H)
        _backward_kernel[(Bn * H,)](x, q, A, B, r_eta, b_eta, r_alpha, b_alpha, *grads, dx, dq, dA, dB, d_re, d_be,
                                    d_ra, d_ba, H, ctx.eta_max, **ctx.meta)
        return (dx, None if ctx.meta["ADAPTIVE_Q"] else dq, dA, dB, d_re.sum(0), d_be.sum(0), d_ra.sum(0), d_ba.sum(0),
                None, None)


def generator_reads(state: dict[str, torch.Tensor], x: torch.Tensor, q: torch.Tensor | None, readouts,
                    activation: str) -> tuple[torch.Tensor, ...]:
    """ops/self_modifying._generated(apply_memory(generators, x), q, readouts) for MLP memories on the kernels:
    k, v, eta, log alpha, q of one chunk from the chunk-start state {"A", "B", ...} (B, H, G+1, ...)."""
    return GeneratorReads.apply(x, q, state["A"], state["B"], readouts.eta_weight, readouts.eta_bias,
                                readouts.alpha_weight, readouts.alpha_bias, readouts.eta_max,
                                SILU if activation == "silu" else GELU)
