"""Per-token math shared by the memory-scan kernels (Triton device functions on register tiles).

A matrix X (R x K) is written with a key kappa (K) and an error e (R) by the rule of ops/memory.py:

    S' = beta S + e kappa^T                     X' = alpha X - eta [dgd] (X kappa) kappa^T - eta S'     (hope)
    S' = beta S - eta e kappa^T                 X' = alpha X - eta [dgd] (X kappa) kappa^T + S'         (titans)
    (no momentum)                               X' = alpha X - eta [dgd] (X kappa) kappa^T - eta e kappa^T

`write` applies it and `write_backward` differentiates it; the clip (the per-token gradient e kappa^T rescaled
to Frobenius norm <= clip) and the memory MLP's activation have their derivatives here too.
"""
from __future__ import annotations

import triton
import triton.language as tl

SILU, GELU = 0, 1


@triton.jit
def mv(w, x):
    """W x for an (R, K) tile and a (K,) vector."""
    return tl.sum(w * x[None, :], axis=1)


@triton.jit
def mtv(w, y):
    """W^T y for an (R, K) tile and an (R,) vector."""
    return tl.sum(w * y[:, None], axis=0)


@triton.jit
def outer(y, x):
    return y[:, None] * x[None, :]


@triton.jit
def mlp_tiles(W: tl.constexpr, M: tl.constexpr, BW: tl.constexpr, BM: tl.constexpr):
    """Offsets and masks of a (W,) vector, of A (W x M) and of B (M x W), row-major, in power-of-two tiles."""
    o_w, o_m = tl.arange(0, BW), tl.arange(0, BM)
    m_w, m_m = o_w < W, o_m < M
    return (o_w, m_w, o_w[:, None] * M + o_m[None, :], m_w[:, None] & m_m[None, :], o_m[:, None] * W + o_w[None, :],
            m_m[:, None] & m_w[None, :])


@triton.jit
def clip_factor(e, key, clip):
    """min(1, clip / ||e key^T||), with ||e key^T||_F = ||e|| ||key|| (ops/memory.clip_factor)."""
    norm = tl.sqrt(tl.sum(e * e)) * tl.sqrt(tl.sum(key * key))
    return tl.minimum(clip / tl.maximum(norm, 1e-12), 1.0)


@triton.jit
def clip_backward(e_raw, key, de, clip):
    """Gradients through e = c e_raw, c = clip / (||e_raw|| ||key||) where that is <= 1 (else c = 1): the
    gradient of e_raw and the term to add to the key's gradient."""
    ne2 = tl.maximum(tl.sum(e_raw * e_raw), 1e-30)
    nk2 = tl.maximum(tl.sum(key * key), 1e-30)
    c = clip / tl.maximum(tl.sqrt(ne2) * tl.sqrt(nk2), 1e-12)
    clipped = c <= 1.0
    de_raw = tl.where(clipped, c * (de - e_raw * (tl.sum(e_raw * de) / ne2)), de)
    d_key = tl.where(clipped, -c * tl.sum(e_raw * de) / nk2, 0.0) * key
    return de_raw, d_key


@triton.jit
def write(x, s, key, e, eta, alpha, beta, MOMENTUM: tl.constexpr, DGD: tl.constexpr):
    """One token's write of matrix x (momentum s): the matrix and momentum after it."""
    x_new = alpha * x
    if DGD:
        x_new = x_new - eta * outer(mv(x, key), key)
    g = outer(e, key)
    if MOMENTUM == 1:
        s = beta * s + g
        x_new = x_new - eta * s
    elif MOMENTUM == 2:
        s = beta * s - eta * g
        x_new = x_new + s
    else:
        x_new = x_new - eta * g
    return x_new, s


@triton.jit
def write_backward(dx, ds, x, s, key, e, eta, alpha, beta, MOMENTUM: tl.constexpr, DGD: tl.constexpr):
    """Given the gradients (dx, ds) of the matrix and momentum after a write from (x, s): those of x and s, of
    the error and the key, and of eta, log alpha and log beta."""
    dxk = mv(dx, key)
    dx_prev = alpha * dx
    d_la = alpha * tl.sum(dx * x)
    d_eta = tl.sum(dxk * 0)
    d_key = key * 0
    if DGD:
        xk = mv(x, key)
        d_eta = d_eta - tl.sum(dxk * xk)
        d_key = d_key - eta * (mtv(x, dxk) + mtv(dx, xk))
        dx_prev = dx_prev - eta * outer(dxk, key)
    ds_prev = ds
    d_lb = d_eta * 0
    if MOMENTUM == 1:  # S' = beta S + e key^T enters x' as -eta S'
        dst = ds - eta * dx
        d_eta = d_eta - tl.sum(dx * (beta * s + outer(e, key)))
        de = mv(dst, key)
        d_key = d_key + mtv(dst, e)
        ds_prev = beta * dst
        d_lb = beta * tl.sum(dst * s)
    elif MOMENTUM == 2:  # S' = beta S - eta e key^T enters x' as +S'
        dst = ds + dx
        dstk = mv(dst, key)
        d_eta = d_eta - tl.sum(dstk * e)
        de = -eta * dstk
        d_key = d_key - eta * mtv(dst, e)
        ds_prev = beta * dst
        d_lb = beta * tl.sum(dst * s)
    else:
        d_eta = d_eta - tl.sum(dxk * e)
        de = -eta * dxk
        d_key = d_key - eta * mtv(dx, e)
    return dx_prev, ds_prev, de, d_key, d_eta, d_la, d_lb


@triton.jit
def act(a, ACT: tl.constexpr):
    """The MLP memory's activation: silu or (erf) gelu."""
    if ACT == SILU:
        return a * tl.sigmoid(a)
    return 0.5 * a * (1 + tl.erf(a * 0.7071067811865476))


@triton.jit
def act_grad(a, ACT: tl.constexpr):
    if ACT == SILU:
        sg = tl.sigmoid(a)
        return sg * (1 + a * (1 - sg))
    return 0.5 * (1 + tl.erf(a * 0.7071067811865476)) + a * tl.exp(-0.5 * a * a) * 0.3989422804014327


@triton.jit
def act_grad2(a, ACT: tl.constexpr):
    """The activation's second derivative (the inner gradient's error passes through its first)."""
    if ACT == SILU:
        sg = tl.sigmoid(a)
        return sg * (1 - sg) * (2 + a * (1 - 2 * sg))
    return tl.exp(-0.5 * a * a) * 0.3989422804014327 * (2 - a * a)
