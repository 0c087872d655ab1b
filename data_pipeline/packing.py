"""The packed token stream: documents, each followed by eos, concatenated and addressed by position.

Windows are cut from it by absolute token position, so any process can take any window by skipping
what comes before; skipped documents are only measured (byte length), never decoded.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import numpy as np


class TokenStream:
    """Reads documents lazily; keeps only those not yet released (see `release`)."""

    def __init__(self, documents: Iterator[bytes], dtype: np.dtype, eos_id: int) -> None:
        self._documents = documents
        self._dtype = dtype
        self._eos = eos_id
        self._pending: deque[tuple[int, bytes]] = deque()  # (start position, token bytes)
        self._end = 0  # stream position after the last document read (its eos included)
        self._floor = 0  # documents ending at or before this position are dropped

    def _length(self, raw: bytes) -> int:
        return len(raw) // self._dtype.itemsize + 1  # + eos

    def reaches(self, position: int) -> bool:
        """Read documents until the stream holds `position` tokens; False if it ends first."""
        while self._end < position:
            raw = next(self._documents, None)
            if raw is None:
                return False
            start, self._end = self._end, self._end + self._length(raw)
            if self._end > self._floor:
                self._pending.append((start, raw))
        return True

    def release(self, position: int) -> None:
        """Promise never to read before `position`: drop the documents that end there or earlier."""
        self._floor = position
        while self._pending and self._pending[0][0] + self._length(self._pending[0][1]) <= position:
            self._pending.popleft()

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, stop) and a bool array marking the positions where a document starts.

        Needs `reaches(stop)` to have returned True and `start` not released."""
        assert self._pending and self._pending[0][0] <= start and stop <= self._end, "range not held"
        size = self._dtype.itemsize
        tokens = np.empty(stop - start, dtype=self._dtype)
        starts = np.zeros(stop - start, dtype=bool)
        for doc_start, raw in self._pending:
            n = len(raw) // size
            doc_end = doc_start + n + 1
            if doc_end <= start:
                continue
            if doc_start >= stop:
                break
            lo, hi = max(start, doc_start), min(stop, doc_start + n)  # token part (eos excluded)
            if hi > lo:
                tokens[lo - start:hi - start] = np.frombuffer(raw, self._dtype, hi - lo, (lo - doc_start) * size)
            if start <= doc_start + n < stop:
                tokens[doc_start + n - start] = self._eos
            if doc_start >= start:
                starts[doc_start - start] = True
        return tokens, starts
