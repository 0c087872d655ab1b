"""Helpers for the data pipeline tests: synthetic documents and reference readers that use only
tarfile/numpy (not the code under test)."""
from __future__ import annotations

import random
import tarfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
VOCAB = 400


def make_documents(n: int, seed: int) -> list[str]:
    """Deterministic pseudo-English documents of varying length, some with several lines."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(1, 8))) for _ in range(300)]
    docs = []
    for _ in range(n):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) for _ in range(rng.randint(1, 4))]
        docs.append("\n".join(lines).capitalize() + ".")
    return docs


def read_tar_documents(path: Path, dtype: str) -> list[np.ndarray]:
    """Reference reader: token arrays of the readable members of one shard, via tarfile."""
    out = []
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                out.append(np.frombuffer(tar.extractfile(member).read(), dtype=dtype))
    except tarfile.TarError:
        pass
    return out


def stream_of(batches: list[dict], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Rebuild the token stream and doc-start flags from consecutive overlapping windows."""
    tokens = [b["tokens"].numpy() for b in batches]
    starts = [b["doc_start"].numpy() for b in batches]
    windows = np.concatenate(tokens)
    flat = np.concatenate([windows[:, :seq_len].reshape(-1), windows[-1, seq_len:]])
    return flat, np.concatenate(starts).reshape(-1)


def split_documents(stream: np.ndarray, eos: int) -> list[tuple[int, ...]]:
    """Complete documents (eos-terminated) in a token stream."""
    ends = np.flatnonzero(stream == eos)
    bounds = np.concatenate([[-1], ends])
    return [tuple(stream[a + 1:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]


def take(iterable, n: int | None = None) -> list[dict]:
    """The first n batches (all when n is None)."""
    out = []
    for batch in iterable:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def windows(batches: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """All samples of a batch list, stacked: tokens (N, seq_len+1), doc_start (N, seq_len)."""
    return (np.concatenate([b["tokens"].numpy() for b in batches]),
            np.concatenate([b["doc_start"].numpy() for b in batches]))
