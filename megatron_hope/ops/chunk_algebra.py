"""Dual (chunk-parallel) form of one chunk of DGD updates to a matrix memory W (d_out x d_in).

Token rule inside a chunk (hope_spec.md, project conventions), with keys kappa_t, errors e_t (the inner
gradient is e_t kappa_t^T, evaluated at the chunk-start state), retention alpha_t, learning rate eta_t,
momentum decay beta_t:

    S_t = beta_t S_{t-1} + e_t kappa_t^T                                  (momentum, "hope" form)
    W_t = W_{t-1} (alpha_t I - [dgd] eta_t kappa_t kappa_t^T) - eta_t S_t

or, in the "titans" form, S_t = beta_t S_{t-1} - eta_t e_t kappa_t^T and W_t = W_{t-1}(...) + S_t.
Document starts fall on chunk starts only (ops/packing.py), so a chunk holds one segment of one document.

Unrolling the recurrence (all products in log space, hope_spec.md 2.1) gives, for t in the chunk,

    W_t = g_t W_c + sigma c_t S_c - sum_r Dm[t,r] e_r kappa_r^T - [dgd] sum_s G[t,s] eta_s x_s kappa_s^T

with x_s = W_{s-1} kappa_s. The x's solve a unit lower-triangular system (the UT transform of the delta
rule, as in DeltaNet / Gated DeltaNet chunk kernels), so a chunk costs a few (L x L) and (L x d) matmuls
instead of L sequential rank-1 updates. Primed coefficients (Gp, gp, Dmp, cp) are the same sums up to
t-1, i.e. the state before writing token t.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

MomentumForm = Literal["hope", "titans"]


def _masked_exp(diff: Tensor, outside: Tensor) -> Tensor:
    """exp(diff), zero where `outside` holds."""
    return diff.masked_fill(outside, float("-inf")).exp()


@dataclass
class ChunkGates:
    """Per-token gates of one chunk, shared by every memory updated with them. Shapes (..., L)."""

    eta: Tensor
    log_alpha: Tensor
    log_beta: Tensor | None  # None: no momentum
    momentum_form: MomentumForm = "hope"


@dataclass
class ChunkCoefficients:
    g: Tensor  # (..., L) decay of the chunk-start state through t
    gp: Tensor  # (..., L) ... through t-1
    G: Tensor  # (..., L, L) prod_{j=s+1..t} alpha_j for s <= t
    Gp: Tensor  # (..., L, L) prod_{j=s+1..t-1} alpha_j for s < t
    Dm: Tensor  # (..., L, L) coefficient of e_r kappa_r^T in W_t
    Dmp: Tensor  # (..., L, L) ... in W_{t-1}
    c: Tensor | None  # (..., L) coefficient of S_c in W_t (None without momentum)
    cp: Tensor | None
    sigma: float  # sign of the S_c term
    mom_c: Tensor | None  # (..., L) coefficient of S_c in the momentum S_t
    mom_rows: Tensor | None  # (..., L, L) coefficient of e_r kappa_r^T in S_t
    eta: Tensor

    @staticmethod
    def build(gates: ChunkGates) -> "ChunkCoefficients":
        la, eta = gates.log_alpha, gates.eta
        L = la.shape[-1]
        upper = torch.ones(L, L, dtype=torch.bool, device=la.device).triu()  # s >= t
        future = upper.triu(1)  # s > t
        Lc = torch.cumsum(la, dim=-1)
        g = Lc.exp()
        gp = (Lc - la).exp()
        diff = Lc[..., :, None] - Lc[..., None, :]
        G = _masked_exp(diff, future)
        Gp = _masked_exp(diff - la[..., :, None], upper)

        if gates.log_beta is None:
            Dm, Dmp = G * eta[..., None, :], Gp * eta[..., None, :]
            return ChunkCoefficients(g, gp, G, Gp, Dm, Dmp, None, None, 1.0, None, None, eta)

        Lb = torch.cumsum(gates.log_beta, dim=-1)
        Bm = _masked_exp(Lb[..., :, None] - Lb[..., None, :], future)
        b = Lb.exp()  # coefficient of S_c in S_s
        if gates.momentum_form == "hope":
            # W gets -eta_s S_s with S_s = b_s S_c + sum_r Bm[s,r] e_r kappa_r^T
            c = (G @ (eta * b)[..., None])[..., 0]
            cp = (Gp @ (eta * b)[..., None])[..., 0]
            Dm, Dmp = G @ (eta[..., :, None] * Bm), Gp @ (eta[..., :, None] * Bm)
            sigma, mom_rows = -1.0, Bm
        else:
            # W gets +S_s with S_s = b_s S_c - sum_r Bm[s,r] eta_r e_r kappa_r^T
            c = (G @ b[..., None])[..., 0]
            cp = (Gp @ b[..., None])[..., 0]
            Dm, Dmp = (G @ Bm) * eta[..., None, :], (Gp @ Bm) * eta[..., None, :]
            sigma, mom_rows = 1.0, -Bm * eta[..., None, :]
        return ChunkCoefficients(g, gp, G, Gp, Dm, Dmp, c, cp, sigma, b, mom_rows, eta)

    def unbind_chunks(self) -> list["ChunkCoefficients"]:
        """Coefficients built for many chunks at once (a chunk dim before the token dims) -> one per chunk."""
        pairs = ("G", "Gp", "Dm", "Dmp", "mom_rows")
        fields = {}
        for name in ("g", "gp", "G", "Gp", "Dm", "Dmp", "c", "cp", "mom_c", "mom_rows", "eta"):
            t = getattr(self, name)
            fields[name] = [None] * self.g.shape[-2] if t is None else t.unbind(-3 if name in pairs else -2)
        return [ChunkCoefficients(sigma=self.sigma, **{name: f[i] for name, f in fields.items()})
                for i in range(self.g.shape[-2])]

    def detached(self) -> "ChunkCoefficients":
        """Stop-grad writes: the update terms carry no gradient; the decay of the chunk-start state still does."""
        d = lambda t: None if t is None else t.detach()  # noqa: E731
        return ChunkCoefficients(self.g, self.gp, d(self.G), d(self.Gp), d(self.Dm), d(self.Dmp), d(self.c),
                                 d(self.cp), self.sigma, d(self.mom_c), d(self.mom_rows), d(self.eta))


def _bmv(W: Tensor, Z: Tensor) -> Tensor:
    """Apply W (..., d_out, d_in) to each row of Z (..., L, d_in) -> (..., L, d_out)."""
    return Z @ W.transpose(-1, -2)


def solve_unitriangular(A: Tensor, B: Tensor, upper: bool) -> Tensor:
    """A^-1 B for A (..., L, L) taken with a unit diagonal, B (..., L, d). When A is shared by a stack of memories
    (size 1 in the memory dim -3, B's is n > 1), one solve with the memories side by side in the columns,
    (..., 1, L, n d), instead of torch expanding A and solving n times."""
    n = B.shape[-3] if B.dim() >= 3 else 1
    if A.dim() < 3 or A.shape[-3] != 1 or n == 1:
        return torch.linalg.solve_triangular(A, B, upper=upper, unitriangular=True)
    L, d = B.shape[-2:]
    X = torch.linalg.solve_triangular(A, B.movedim(-3, -2).reshape(*B.shape[:-3], 1, L, n * d), upper=upper,
                                      unitriangular=True)
    return X.reshape(*X.shape[:-3], L, n, d).movedim(-2, -3)


@dataclass
class MatrixWrite:
    """One chunk's writes to one matrix memory, in dual form. Build with `MatrixWrite.solve`."""

    coef: ChunkCoefficients
    W_c: Tensor  # chunk-start state (..., d_out, d_in)
    S_c: Tensor | None
    K: Tensor  # keys (..., L, d_in)
    E: Tensor  # errors (..., L, d_out)
    X: Tensor | None  # W_{t-1} kappa_t (..., L, d_out) when the DGD factor applies
    KK: Tensor | None = None  # kappa_t . kappa_s and S_c kappa_t, kept from the solve for a backward
    KS: Tensor | None = None

    @staticmethod
    def solve(coef: ChunkCoefficients, W_c: Tensor, S_c: Tensor | None, K: Tensor, E: Tensor, dgd: bool,
              differentiable: bool = True, KW: Tensor | None = None) -> "MatrixWrite":
        """KW: W_c applied to the keys, when the caller has it (the inner-gradient step computes it)."""
        X = KK = KS = None
        if dgd:
            KK = K @ K.transpose(-1, -2)  # (..., L, L): kappa_t . kappa_s
            R = coef.gp[..., None] * (_bmv(W_c, K) if KW is None else KW)
            if S_c is not None:
                KS = _bmv(S_c, K)
                R = R + coef.sigma * coef.cp[..., None] * KS
            R = R - (KK * coef.Dmp) @ E
            Tm = KK * coef.Gp * coef.eta[..., None, :]  # strictly lower: Gp is zero on and above the diagonal
            X = solve_unitriangular(Tm, R, upper=False)
            if not differentiable:
                X = X.detach()
        return MatrixWrite(coef, W_c, S_c, K, E, X, KK, KS)

    def select_memory(self, index: int) -> "MatrixWrite":
        """The writes of one memory of a stack (memory dim at -3 of states, keys and errors; the shared
        coefficients and broadcast keys have size 1 there)."""
        def pick(t: Tensor | None) -> Tensor | None:
            return t if t is None or t.shape[-3] == 1 else t.narrow(-3, index % t.shape[-3], 1)
        return MatrixWrite(self.coef, pick(self.W_c), pick(self.S_c), pick(self.K), pick(self.E), pick(self.X))

    def read(self, Z: Tensor, readout: str) -> Tensor:
        """W_t z_t for each token (after_write), W_{t-1} z_t (before_write) or W_c z_t (chunk_start)."""
        return self.read_with_products(Z, readout)[0]

    def read_with_products(self, Z: Tensor, readout: str) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """The read-outs and the products they are formed from: W_c z_t, z_t . kappa_r and S_c z_t."""
        c = self.coef
        start = _bmv(self.W_c, Z)
        if readout == "chunk_start":
            return start, start, None, None
        after = readout == "after_write"
        g, G, Dm, cS = (c.g, c.G, c.Dm, c.c) if after else (c.gp, c.Gp, c.Dmp, c.cp)
        ZK = Z @ self.K.transpose(-1, -2)  # (..., L, L): z_t . kappa_r
        out = g[..., None] * start - (ZK * Dm) @ self.E
        ZS = None
        if self.S_c is not None:
            ZS = _bmv(self.S_c, Z)
            out = out + c.sigma * cS[..., None] * ZS
        if self.X is not None:
            out = out - (ZK * G * c.eta[..., None, :]) @ self.X
        return out, start, ZK, ZS

    def final(self, last: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """State (and momentum) after the chunk's last token, or after token `last` (the coefficients' leading
        dims, long) of each row: a row whose document ends inside the chunk, before the pads."""
        c = self.coef
        W = at_token(c.g, last)[..., None, None] * self.W_c - self.E.transpose(-1, -2) @ (at_token_row(c.Dm, last)[..., None] * self.K)
        if self.X is not None:
            W = W - self.X.transpose(-1, -2) @ ((at_token_row(c.G, last) * c.eta)[..., None] * self.K)
        S = None
        if self.S_c is not None:
            W = W + c.sigma * at_token(c.c, last)[..., None, None] * self.S_c
            S = (at_token(c.mom_c, last)[..., None, None] * self.S_c
                 + self.E.transpose(-1, -2) @ (at_token_row(c.mom_rows, last)[..., None] * self.K))
        return W, S


def write_matrix(coef: ChunkCoefficients, W_c: Tensor, S_c: Tensor | None, K: Tensor, E: Tensor, KW: Tensor | None,
                 dgd: bool, differentiable: bool, last: Tensor | None, Z: Tensor | None, readout: str,
                 read_memory: int | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One matrix's chunk: (state after the chunk or after token `last`, its momentum, read-outs of Z by memory
    `read_memory` of a stack, None without Z), as plain tensor ops."""
    write = MatrixWrite.solve(coef, W_c, S_c, K, E, dgd, differentiable, KW)
    W, S = write.final(last)
    if Z is None:
        return W, S, None
    return W, S, (write.select_memory(read_memory) if read_memory is not None else write).read(Z, readout)


def at_token(x: Tensor, last: Tensor | None) -> Tensor:
    """Entry `last` of a per-token coefficient (..., L) -> (...); the last one if None."""
    return x[..., -1] if last is None else x.gather(-1, last[..., None])[..., 0]


def at_token_row(x: Tensor, last: Tensor | None) -> Tensor:
    """Row `last` of a token-pair coefficient (..., L, L) -> (..., L); the last row if None."""
    return x[..., -1, :] if last is None else x.gather(-2, last[..., None, None].expand(*last.shape, 1, x.shape[-1]))[..., 0, :]
