"""Packed documents on a per-document chunk grid.

A packed row holds several documents. The memories' chunk grid (the tokens whose inner gradients share one
chunk-start state) restarts at every document start, so a document computes the same at any offset in the row
and the same as alone (packing invariance; varlen kernels do the same with cu_seqlens). The chunk-parallel
scans get this by moving every document to start at a multiple of the chunk size: the gap after the previous
document holds pads, where the scans write nothing (zero key and learning rate, unit decays) and whose
outputs are dropped. Rows shorter than the laid-out length end in pads; the length is rounded up to
T + chunk_size * 2^k unless the caller runs outside compiled code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@torch.compiler.disable  # a host sync; compiled code then sees (and guards on) the rounded length only
def _laid_out_length(last_index: Tensor, T: int, chunk_size: int, rounded: bool) -> int:
    """T when no row needs pads, else the longest laid-out row, or with `rounded` T + chunk_size * 2^k covering
    it: few values, so a compiled model meets few shapes."""
    extra = int(last_index.max()) - (T - 1)
    if extra == 0 or not rounded:
        return T + extra
    return T + chunk_size * 2 ** math.ceil(math.log2(math.ceil(extra / chunk_size)))


@dataclass
class DocumentLayout:
    index: Tensor  # (..., T) long: position of each token in its laid-out row
    length: int  # laid-out length T' of every row
    keep: Tensor  # (..., T') bool: a real token (not a pad)
    doc_start: Tensor  # (..., T') bool: document starts, each at a multiple of the chunk size
    row_end: Tensor  # (...) long: laid-out position after each row's last real token

    @staticmethod
    def build(doc_start: Tensor, chunk_size: int, rounded: bool = True) -> "DocumentLayout | None":
        """The layout of rows with document starts `doc_start` (..., T), or None when every document already
        starts on the grid (one host sync). rounded=False: no trailing pad chunks beyond the longest row (for
        callers outside compiled code)."""
        T = doc_start.shape[-1]
        pos = torch.arange(T, device=doc_start.device)
        starts = doc_start.clone()
        starts[..., 0] = False  # the row start is always on the grid
        # start of the document holding token t-1; the previous document's length decides the pad before t
        seg_start = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=-1).values
        prev_start = torch.cat([torch.zeros_like(seg_start[..., :1]), seg_start[..., :-1]], dim=-1)
        pad = torch.where(starts, (prev_start - pos) % chunk_size, torch.zeros_like(pos))
        index = pos + torch.cumsum(pad, dim=-1)
        length = _laid_out_length(index[..., -1], T, chunk_size, rounded)
        if length == T:
            return None
        keep = torch.zeros(*doc_start.shape[:-1], length, dtype=torch.bool, device=doc_start.device)
        keep.scatter_(-1, index, True)
        laid_starts = torch.zeros_like(keep).scatter_(-1, index, doc_start)
        return DocumentLayout(index, length, keep, laid_starts, index[..., -1] + 1)

    def _index_like(self, x: Tensor, time_dim: int) -> Tensor:
        """The index viewed and expanded for x: the layout's leading dims first, time at `time_dim`."""
        time_dim %= x.dim()
        lead = self.index.dim() - 1
        shape = (*self.index.shape[:-1], *[1] * (time_dim - lead), self.index.shape[-1], *[1] * (x.dim() - time_dim - 1))
        return self.index.view(shape).expand(*x.shape[:time_dim], self.index.shape[-1], *x.shape[time_dim + 1:])

    def scatter(self, x: Tensor, time_dim: int, fill: float = 0.0) -> Tensor:
        """x with time (size T) at `time_dim` -> the laid-out x (size T' there), `fill` at pads."""
        time_dim %= x.dim()
        shape = (*x.shape[:time_dim], self.length, *x.shape[time_dim + 1:])
        return x.new_full(shape, fill).scatter(time_dim, self._index_like(x, time_dim), x)

    def gather(self, y: Tensor, time_dim: int) -> Tensor:
        """The laid-out y -> the original token order (pads dropped)."""
        return torch.gather(y, time_dim % y.dim(), self._index_like(y, time_dim))

    def row_active(self, chunk_start: int) -> Tensor:
        """(...) bool: rows with real tokens at or after `chunk_start`; trailing pad chunks leave the state alone."""
        return self.row_end > chunk_start

    def last_in_chunk(self, chunk_start: int, chunk_len: int) -> Tensor:
        """(...) long: each row's last real token in the chunk, relative to its start (a row's final state is
        taken there, before its trailing pads)."""
        return (self.row_end - chunk_start - 1).clamp(0, chunk_len - 1)
