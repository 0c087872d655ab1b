"""Small building blocks shared by every architecture: RMSNorm, SwiGLU, rotary embedding, short causal conv."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter that a parallel plan sharded (a DTensor), or the tensor itself. Parameters
    used by hand-written math (per-head memory states, conv filters) are read through it, as torchtitan's experts
    are; the parallel plan decides the sharding, the model code stays the same on one process."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_dict(params: nn.ParameterDict) -> dict[str, torch.Tensor]:
    return {n: local(p) for n, p in params.items()}


def apex_rms_norm():
    """NVIDIA apex's fused RMSNorm when apex is installed (it is not on PyPI; the PyPI package named `apex` is an
    unrelated web toolkit, whose import fails here and leaves torch's kernel in use)."""
    try:
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    except ImportError:
        return None
    return fused_rms_norm_affine


_APEX_RMS_NORM = apex_rms_norm()


class RMSNorm(nn.Module):
    """RMS normalisation with a learned scale; apex's fused CUDA kernel when present, else torch's."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _APEX_RMS_NORM is not None and x.is_cuda and not isinstance(x, DTensor):
            return _APEX_RMS_NORM(x, self.weight, (x.shape[-1],), self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLU(nn.Module):
    """y = W_down (silu(W_gate x) * W_up x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class CausalDepthwiseConv1d(nn.Module):
    """Per-channel causal convolution over time (width 4 in HOPE/Titans, spec 1.1). Input (B, T, C).

    With `doc_start` (B, T) bool, taps never reach across a document start (each document is convolved
    as if it started the sequence), so packed documents do not leak into each other. With `tail`
    (B, width - 1, C), the inputs of the previous call's last width - 1 tokens (`next_tail`), a sequence
    split over several calls is convolved as in one call; without it the sequence starts here.
    """

    def __init__(self, channels: int, width: int = 4):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, width))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.zero_()
        self.weight[:, -1] = 1.0  # identity at init: tap on the current token

    def forward(self, x: torch.Tensor, doc_start: torch.Tensor | None = None,
                tail: torch.Tensor | None = None) -> torch.Tensor:
        weight = local(self.weight)  # channels follow the (possibly column-parallel) input projection
        if self.width == 1:
            return x * weight[:, 0]
        T, n = x.shape[1], self.width - 1
        xp = self._extend(x, tail)
        reach = None  # (B, T, 1): how far back t's document goes; a tap looking back further is masked
        if doc_start is not None:
            reach = (torch.arange(T, device=x.device) - self._doc_begin(doc_start))[:, :, None]
        y = x * weight[:, n]  # tap n: the current token, always inside its own document
        for j in range(n):  # tap j looks back n - j tokens: x_{t - n + j} = xp[t + j]
            tap = xp[:, j:j + T]
            if reach is not None:
                tap = tap * (reach >= n - j).to(x.dtype)
            y = torch.addcmul(y, tap, weight[:, j])
        return y

    def next_tail(self, x: torch.Tensor, doc_start: torch.Tensor | None = None,
                  tail: torch.Tensor | None = None) -> torch.Tensor:
        """The carry for the next call: the inputs of the last width - 1 tokens (B, width - 1, C), zeros where
        they come before the last document start, which no later tap may reach."""
        n = self.width - 1
        xp = self._extend(x[:, max(x.shape[1] - n, 0):], tail)  # only the last tokens: no copy of x
        last = xp[:, xp.shape[1] - n:]
        if doc_start is None:
            return last
        T = x.shape[1]
        pos = torch.arange(T - n, T, device=x.device)
        keep = pos[None, :] >= self._doc_begin(doc_start)[:, -1:]  # (B, n)
        return last * keep[..., None].to(last.dtype)

    def _extend(self, x: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
        """x preceded by the previous call's tail, or by zeros: (B, T + width - 1, C)."""
        if tail is None:
            return F.pad(x, (0, 0, self.width - 1, 0))
        return torch.cat([tail.to(x.dtype), x], dim=1)

    def _doc_begin(self, doc_start: torch.Tensor) -> torch.Tensor:
        """(B, T) position of each token's document start; -width (every tap valid, the carried tail included)
        before the first start of this call, whose document began in an earlier call."""
        pos = torch.arange(doc_start.shape[1], device=doc_start.device)
        return torch.cummax(torch.where(doc_start, pos, -self.width), dim=1).values


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)compute the tables, e.g. after a model built on the meta device is materialised."""
        dev = self.cos.device
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=dev)
                                         / self.head_dim))
        freqs = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float32, device=dev), inv_freq)
        self.cos.copy_(freqs.cos())
        self.sin.copy_(freqs.sin())

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, H, T, D). positions: (B, T) token positions (restart at document starts), default 0..T-1."""
        T = x.shape[-2]
        if positions is None:
            cos, sin = self.cos[:T], self.sin[:T]
        else:
            cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.flatten(-2).to(x.dtype)


def positions_from_doc_start(doc_start: torch.Tensor) -> torch.Tensor:
    """(B, T) bool document starts -> (B, T) position of each token inside its document."""
    T = doc_start.shape[1]
    pos = torch.arange(T, device=doc_start.device).expand_as(doc_start)
    start = torch.cummax(torch.where(doc_start, pos, torch.zeros_like(pos)), dim=1).values
    return pos - start
