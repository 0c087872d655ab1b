"""One chunk's dual-form writes to one matrix memory (chunk_algebra.MatrixWrite: the DGD solve, the state and
momentum after the chunk, the read-outs) as one autograd op with a hand-written backward.

The forward is MatrixWrite's; the backward differentiates it in closed form (notation of chunk_algebra.py,
T = transpose, o = element-wise product, r = the row of the chunk's last token):

    read     out = g o (Z W_c^T) - (ZK o Dm) E + sigma c o (Z S_c^T) - (ZK o G eta^T) X,   ZK = Z K^T
    final    W_r = g_r W_c - E^T (Dm_r o K) - X^T (G_r eta o K) + sigma c_r S_c,   S_r = b_r S_c + E^T (M_r o K)
    solve    (I + Tm) X = R,   Tm = KK o Gp eta^T,   R = gp o (K W_c^T) + sigma cp o (K S_c^T) - (KK o Dmp) E
             => dR = (I + Tm)^-T dX,   dTm = -(dR X^T) strictly below the diagonal

so autograd records one node per matrix and chunk instead of the ~100 element-wise and matmul nodes of the
same math; the products are the ones the forward already forms. model.memory.write_backward = "autograd"
differentiates MatrixWrite itself instead (the reference the tests compare against).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_hope.ops.chunk_algebra import (ChunkCoefficients, MatrixWrite, at_token, at_token_row,
                                             solve_unitriangular)

_INPUTS = ("W_c", "S_c", "K", "E", "KW", "Z", "g", "gp", "G", "Gp", "Dm", "Dmp", "c", "cp", "eta", "mom_c",
           "mom_rows", "last")


def dual_form_write(coef: ChunkCoefficients, W_c: Tensor, S_c: Tensor | None, K: Tensor, E: Tensor,
                    KW: Tensor | None, dgd: bool, differentiable: bool, last: Tensor | None, Z: Tensor | None,
                    readout: str, read_memory: int | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """chunk_algebra.write_matrix with the hand-written backward: the same arguments and results."""
    c = coef
    return _DualFormWrite.apply(W_c, S_c, K, E, KW, Z, c.g, c.gp, c.G, c.Gp, c.Dm, c.Dmp, c.c, c.cp, c.eta, c.mom_c,
                                c.mom_rows, last, (c.sigma, dgd, differentiable, readout, read_memory))


def _T(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _pick(t: Tensor | None, index: int | None) -> Tensor | None:
    """One memory of a stack (memory dim -3), as MatrixWrite.select_memory picks it."""
    return t if t is None or index is None or t.shape[-3] == 1 else t.narrow(-3, index % t.shape[-3], 1)


def _unpick(grad: Tensor, full: Tensor, index: int | None) -> Tensor:
    """The gradient of a picked memory, placed back into the stack (zeros for the other memories)."""
    if index is None or full.shape[-3] == 1:
        return grad
    i, n = index % full.shape[-3], full.shape[-3]
    return F.pad(grad, (0, 0, 0, 0, i, n - 1 - i))


def _like(x: Tensor, ref: Tensor) -> Tensor:
    """x summed over the dims where `ref` has size 1 (a gradient of a tensor shared by the memories of a stack)."""
    return x if x.shape == ref.shape else x.sum_to_size(ref.shape)


def _token_grad(d: Tensor, x: Tensor, last: Tensor | None) -> Tensor:
    """Gradient of x (..., L) from the gradient d of at_token(x, last)."""
    d = _like(d, x[..., 0])
    if last is None:
        return F.pad(d[..., None], (x.shape[-1] - 1, 0))
    return torch.zeros_like(x).scatter_(-1, last[..., None], d[..., None])


def _row_grad(d: Tensor, x: Tensor, last: Tensor | None) -> Tensor:
    """Gradient of x (..., L, L) from the gradient d of at_token_row(x, last)."""
    d = _like(d, x[..., 0, :])
    if last is None:
        return F.pad(d[..., None, :], (0, 0, x.shape[-2] - 1, 0))
    return torch.zeros_like(x).scatter_(-2, last[..., None, None].expand(*last.shape, 1, x.shape[-1]), d[..., None, :])


def _total(parts: list[Tensor], ref: Tensor) -> Tensor:
    """The sum of gradient parts, each reduced to ref's shape first (they broadcast differently over memories)."""
    total = _like(parts[0], ref)
    for p in parts[1:]:
        total = total + _like(p, ref)
    return total


class _DualFormWrite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, W_c, S_c, K, E, KW, Z, g, gp, G, Gp, Dm, Dmp, c, cp, eta, mom_c, mom_rows, last, meta):
        sigma, dgd, differentiable, readout, read_memory = meta
        coef = ChunkCoefficients(g, gp, G, Gp, Dm, Dmp, c, cp, sigma, mom_c, mom_rows, eta)
        write = MatrixWrite.solve(coef, W_c, S_c, K, E, dgd, KW=KW)
        W, S = write.final(last)
        out = start = ZK = ZS = None
        if Z is not None:
            picked = write.select_memory(read_memory) if read_memory is not None else write
            out, start, ZK, ZS = picked.read_with_products(Z, readout)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(W_c, S_c, K, E, KW, Z, write.X, g, gp, G, Gp, Dm, Dmp, c, cp, eta, mom_c, mom_rows,
                              last, write.KK, write.KS, start, ZK, ZS)
        ctx.meta = meta
        return W, S, out

    @staticmethod
    def backward(ctx, dW, dS, dOut):
        (W_c, S_c, K, E, KW, Z, X, g, gp, G, Gp, Dm, Dmp, c, cp, eta, mom_c, mom_rows, last,
         KK, KS, start, ZK, ZS) = ctx.saved_tensors
        sigma, _, differentiable, readout, read_memory = ctx.meta
        saved = dict(zip(_INPUTS, (W_c, S_c, K, E, KW, Z, g, gp, G, Gp, Dm, Dmp, c, cp, eta, mom_c, mom_rows)))
        grads: dict[str, list[Tensor]] = defaultdict(list)
        dX: list[Tensor] = []
        col_eta = eta[..., None, :]  # eta_s along the columns of a token-pair matrix

        if dOut is not None:  # read-outs of the picked memory
            Wc_s, Sc_s, K_s, E_s, X_s = (_pick(t, read_memory) for t in (W_c, S_c, K, E, X))
            d_start = dOut
            if readout != "chunk_start":
                names = ("g", "G", "Dm", "c") if readout == "after_write" else ("gp", "Gp", "Dmp", "cp")
                gg, GG, DD, cc = (saved[n] for n in names)
                grads[names[0]].append((dOut * start).sum(-1))
                d_start = gg[..., None] * dOut
                d_ZK = -(dOut @ _T(E_s))
                grads[names[2]].append(d_ZK * ZK)
                grads["E"].append(_unpick(-(_T(ZK * DD) @ dOut), E, read_memory))
                d_ZK = d_ZK * DD
                if Sc_s is not None:
                    grads[names[3]].append(sigma * (dOut * ZS).sum(-1))
                    d_ZS = sigma * cc[..., None] * dOut
                    grads["Z"].append(d_ZS @ Sc_s)
                    grads["S_c"].append(_unpick(_T(d_ZS) @ Z, S_c, read_memory))
                if X_s is not None:
                    GE = GG * col_eta
                    d_P = -(dOut @ _T(X_s))
                    dX.append(_unpick(-(_T(ZK * GE) @ dOut), X, read_memory))
                    t = d_P * ZK
                    grads[names[1]].append(t * col_eta)
                    grads["eta"].append((t * GG).sum(-2))
                    d_ZK = d_ZK + d_P * GE
                grads["Z"].append(d_ZK @ K_s)
                grads["K"].append(_unpick(_T(d_ZK) @ Z, K, read_memory))
            grads["Z"].append(d_start @ Wc_s)
            grads["W_c"].append(_unpick(_T(d_start) @ Z, W_c, read_memory))

        if dW is not None:  # the state after the chunk (or after token `last`)
            grads["g"].append(_token_grad((dW * W_c).sum((-1, -2)), g, last))
            grads["W_c"].append(at_token(g, last)[..., None, None] * dW)
            Dm_r = at_token_row(Dm, last)[..., None]
            grads["E"].append(-((Dm_r * K) @ _T(dW)))
            d_Q = _like(-(E @ dW), K)  # the keys and coefficients are shared by a stack's memories: reduce first
            grads["Dm"].append(_row_grad((d_Q * K).sum(-1), Dm, last))
            grads["K"].append(d_Q * Dm_r)
            if X is not None:
                G_r = at_token_row(G, last)
                GE_r = (G_r * eta)[..., None]
                dX.append(-((GE_r * K) @ _T(dW)))
                d_Q = _like(-(X @ dW), K)
                d_GE = (d_Q * K).sum(-1)
                grads["G"].append(_row_grad(d_GE * eta, G, last))
                grads["eta"].append(d_GE * G_r)
                grads["K"].append(d_Q * GE_r)
            if S_c is not None:
                grads["c"].append(_token_grad(sigma * (dW * S_c).sum((-1, -2)), c, last))
                grads["S_c"].append(sigma * at_token(c, last)[..., None, None] * dW)

        if dS is not None:  # the momentum after the chunk
            grads["mom_c"].append(_token_grad((dS * S_c).sum((-1, -2)), mom_c, last))
            grads["S_c"].append(at_token(mom_c, last)[..., None, None] * dS)
            M_r = at_token_row(mom_rows, last)[..., None]
            grads["E"].append((M_r * K) @ _T(dS))
            d_Q = _like(E @ dS, K)
            grads["mom_rows"].append(_row_grad((d_Q * K).sum(-1), mom_rows, last))
            grads["K"].append(d_Q * M_r)

        if dX and differentiable:  # the DGD solve (stop-grad writes detach X)
            d_X = _total(dX, X)
            d_R = solve_unitriangular(_T(KK * Gp * col_eta), d_X, upper=True)
            d_Tm = -(d_R @ _T(X)).tril(-1)
            t = d_Tm * KK
            grads["Gp"].append(t * col_eta)
            grads["eta"].append((t * Gp).sum(-2))
            d_KK = d_Tm * Gp * col_eta
            grads["gp"].append((d_R * (KW if KW is not None else K @ _T(W_c))).sum(-1))
            d_KW = gp[..., None] * d_R
            if KW is not None:
                grads["KW"].append(d_KW)
            else:
                grads["K"].append(d_KW @ W_c)
                grads["W_c"].append(_T(d_KW) @ K)
            if S_c is not None:
                grads["cp"].append(sigma * (d_R * KS).sum(-1))
                d_KS = sigma * cp[..., None] * d_R
                grads["K"].append(d_KS @ S_c)
                grads["S_c"].append(_T(d_KS) @ K)
            grads["E"].append(-(_T(KK * Dmp) @ d_R))
            d_P = -(d_R @ _T(E))
            grads["Dmp"].append(d_P * KK)
            d_KK = d_KK + d_P * Dmp
            d_KK = _like(d_KK, KK)
            grads["K"].append((d_KK + _T(d_KK)) @ K)

        out = []
        for name, needed in zip(_INPUTS, ctx.needs_input_grad):
            parts = grads.get(name)
            out.append(_total(parts, saved[name]) if needed and parts else None)
        return (*out, None)
