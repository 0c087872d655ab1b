"""Per-kind counters for bad input: every event is counted, the first of each kind is logged as a warning."""
from __future__ import annotations

import logging


class IssueLog:
    """Counts skipped or repaired input by kind (e.g. "empty_document"); warns once per kind
    (never when `logger` is None: for a pass whose issues are reported by another)."""

    def __init__(self, logger: logging.Logger | None) -> None:
        self.logger = logger
        self.counts: dict[str, int] = {}

    def add(self, kind: str, message: str, n: int = 1) -> None:
        if kind not in self.counts:
            if self.logger is not None:
                self.logger.warning("%s [%s; further cases are only counted]", message, kind)
            self.counts[kind] = 0
        self.counts[kind] += n

    def merge_max(self, counts: dict[str, int]) -> None:
        """Take per-kind maxima from another process's cumulative counts (DataLoader workers all read
        the same stream, so the furthest-ahead count is the one to keep)."""
        for kind, n in counts.items():
            self.counts[kind] = max(self.counts.get(kind, 0), n)

    def __getitem__(self, kind: str) -> int:
        return self.counts.get(kind, 0)
