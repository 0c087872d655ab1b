"""Tokenize text into webdataset shards plus a manifest, with a hash-chosen validation split.

    python -m data_pipeline.prepare --input corpus/ --tokenizer tok/ --out shards/ --shard-tokens 20000000 --workers 2

Reads .txt/.jsonl(.gz) (see documents.py), tokenizes with K worker processes, writes
`train-NNNNNN.tar` / `val-NNNNNN.tar` and `manifest.json` into --out.

Validation split: a document goes to "val" when sha256(split seed, text) falls into the lowest
`--val-fraction` of the hash range, so the choice depends on the text alone (duplicates land on the
same side). If no document qualifies, the one with the smallest hash is taken, so val is never empty.
Two passes over the input: the first only hashes (to apply that rule), the second tokenizes.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing
import multiprocessing.pool
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from .documents import iter_documents, list_input_files
from .errors import DataPipelineError, run_cli
from .issues import IssueLog
from .manifest import MANIFEST_FILE, SPLITS, TOKENS_MEMBER, Manifest, ShardInfo, SplitInfo, token_dtype
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

CHUNK_CHARS = 1 << 18  # documents are sent to workers in chunks of about this many characters


@dataclass(frozen=True)
class PrepareConfig:
    inputs: list[str]
    tokenizer_dir: str
    out_dir: str
    shard_tokens: int = 20_000_000
    workers: int = 2
    val_fraction: float = 0.01
    split_seed: int = 0
    text_field: str = "text"
    overwrite: bool = False

    def validate(self) -> None:
        if self.shard_tokens < 1:
            raise DataPipelineError(f"--shard-tokens must be >= 1, got {self.shard_tokens}")
        if self.workers < 1:
            raise DataPipelineError(f"--workers must be >= 1, got {self.workers}")
        if not 0.0 < self.val_fraction < 1.0:
            raise DataPipelineError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")


def split_hash(text: str, seed: int) -> int:
    """64-bit seeded hash of a document's text."""
    digest = hashlib.sha256(seed.to_bytes(8, "little", signed=True) + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


class _ValRule:
    """Decides val membership: hash below the threshold, or the fallback document when none is."""

    def __init__(self, fraction: float, seed: int, documents: Iterable[str]) -> None:
        self.threshold = int(fraction * 2**64)
        hashes = (split_hash(doc, seed) for doc in documents)
        self.total, self.val, self.fallback, smallest = 0, 0, -1, 2**64
        for i, h in enumerate(hashes):
            self.total += 1
            self.val += h < self.threshold
            if h < smallest:
                smallest, self.fallback = h, i
        if self.val > 0:
            self.fallback = -1
        else:
            self.val = 1

    def is_val(self, index: int, doc_hash: int) -> bool:
        return doc_hash < self.threshold or index == self.fallback


# --- worker side: each process loads the tokenizer once ---------------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(tokenizer_dir)


@dataclass(frozen=True)
class _EncodeChunk:
    """Tokenizes a chunk of documents (in a worker); returns (split hash, token bytes) per document."""

    dtype: str
    seed: int

    def __call__(self, texts: list[str]) -> list[tuple[int, bytes]]:
        assert _worker_tokenizer is not None, "_init_worker was not called"
        ids = _worker_tokenizer.encode_batch(texts)
        return [(split_hash(t, self.seed), np.asarray(i, dtype=self.dtype).tobytes()) for t, i in zip(texts, ids)]


def _chunks(documents: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for doc in documents:
        chunk.append(doc)
        size += len(doc)
        if size >= CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _ordered_map(fn: Callable[[list[str]], list[tuple[int, bytes]]], items: Iterator[list[str]],
                 pool: multiprocessing.pool.Pool | None, max_pending: int) -> Iterator[list[tuple[int, bytes]]]:
    """Like pool.imap, but with at most `max_pending` chunks in flight (imap reads its whole input ahead)."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# --- writer side ---------------------------------------------------------------------------------------------

class _SplitWriter:
    """A webdataset ShardWriter for one split that records per-shard counts and sha256."""

    def __init__(self, out: Path, split: str, shard_tokens: int, itemsize: int) -> None:
        self.shards: list[ShardInfo] = []
        self.documents = self.tokens = 0  # in the shard being written
        self.writer = wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=2**62,
                                      maxsize=shard_tokens * itemsize, post=self._finished,
                                      verbose=0, mtime=0)  # fixed mtime: identical input, identical shards

    def _finished(self, fname: str) -> None:
        path = Path(fname)
        data = path.read_bytes()
        self.shards.append(ShardInfo(path.name, self.documents, self.tokens, len(data),
                                     hashlib.sha256(data).hexdigest()))
        self.documents = self.tokens = 0

    def write(self, index: int, tokens: bytes, n_tokens: int) -> None:
        self.writer.write({"__key__": f"{index:010d}", TOKENS_MEMBER: tokens})  # may close a shard first
        self.documents += 1
        self.tokens += n_tokens

    def close(self) -> SplitInfo:
        self.writer.close()
        return SplitInfo(self.shards)


def _clear_output(out: Path, overwrite: bool) -> None:
    old = [out / MANIFEST_FILE, *sorted(p for split in SPLITS for p in out.glob(f"{split}-*.tar"))]
    old = [p for p in old if p.exists()]
    if old and not overwrite:
        raise DataPipelineError(f"{out} already holds prepared data ({old[0].name}); "
                                "pass --overwrite to replace it or choose another --out")
    for path in old:
        path.unlink()


def prepare(cfg: PrepareConfig) -> Manifest:
    cfg.validate()
    files = list_input_files(cfg.inputs)
    card = Tokenizer(cfg.tokenizer_dir).card  # loading checks the model against its card
    dtype = token_dtype(card.vocab_size)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_output(out, cfg.overwrite)

    rule = _ValRule(cfg.val_fraction, cfg.split_seed, iter_documents(files, IssueLog(None), cfg.text_field))
    if rule.total - rule.val < 1:
        raise DataPipelineError(f"found {rule.total} document(s), all of them for validation; "
                                "add documents or lower --val-fraction")

    issues = IssueLog(log)
    writers = {name: _SplitWriter(out, name, cfg.shard_tokens, dtype.itemsize) for name in SPLITS}
    encode = _EncodeChunk(dtype.str, cfg.split_seed)
    pool = None
    if cfg.workers > 1:
        pool = multiprocessing.Pool(cfg.workers, _init_worker, (str(cfg.tokenizer_dir),))
    else:
        _init_worker(str(cfg.tokenizer_dir))
    try:
        index = 0
        chunks = _chunks(iter_documents(files, issues, cfg.text_field))
        for results in _ordered_map(encode, chunks, pool, max_pending=2 * cfg.workers):
            for doc_hash, tokens in results:
                split = "val" if rule.is_val(index, doc_hash) else "train"
                writers[split].write(index, tokens, len(tokens) // dtype.itemsize)
                index += 1
    finally:
        if pool is not None:
            pool.terminate()
    manifest = Manifest(
        dtype=dtype.str, vocab_size=card.vocab_size, eos_id=card.eos_id, bos_id=card.bos_id,
        pad_id=card.pad_id, tokenizer_sha256=card.model_sha256, val_fraction=cfg.val_fraction,
        split_seed=cfg.split_seed, splits={name: w.close() for name, w in writers.items()},
        issues=dict(issues.counts),
    )
    manifest.save(out)
    return manifest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl(.gz) files or directories")
    parser.add_argument("--tokenizer", required=True, help="directory written by data_pipeline.tokenizer")
    parser.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    parser.add_argument("--shard-tokens", type=int, default=20_000_000, help="tokens per shard (about)")
    parser.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    parser.add_argument("--val-fraction", type=float, default=0.01)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl input")
    parser.add_argument("--overwrite", action="store_true", help="replace data already in --out")
    return parser


def main(argv: list[str] | None = None) -> None:
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    m = prepare(PrepareConfig(a.input, a.tokenizer, a.out, a.shard_tokens, a.workers, a.val_fraction,
                              a.split_seed, a.text_field, a.overwrite))
    for name, split in m.splits.items():
        print(f"{name}: {split.documents} documents, {split.tokens} tokens, {len(split.shards)} shard(s)")
    if m.issues:
        print("skipped or repaired input: " + ", ".join(f"{k}={v}" for k, v in sorted(m.issues.items())))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
