"""Read the document stream of one epoch: seeded shard order, webdataset tar reading, bounded shuffle.

The stream depends only on (manifest, seed, epoch) and is identical in every process that reads it.
Documents come out as raw token bytes (decoding to arrays is left to the packer, which skips most).

Bad shards, per `ReadOptions`:
* missing file: always an error (re-run prepare or restore the file);
* sha256 differs from the manifest (verified on every open unless `verify_checksums=False`):
  an error, or with `skip_corrupt=True` the shard is skipped and counted ("checksum_mismatch");
* unreadable tar data (only reachable without checksum verification): the readable samples are
  used; the failure ("corrupt_tar") and documents lost ("missing_documents") are counted;
* a sample without a whole number of tokens ("bad_sample") or without tokens ("empty_document") is skipped.
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_expander

from .errors import DataPipelineError
from .issues import IssueLog
from .manifest import TOKENS_MEMBER, ShardInfo, SplitInfo

RANDOM_BLOCK = 4096  # random indices are drawn in blocks: one numpy call per block, not per document


@dataclass(frozen=True)
class ReadOptions:
    verify_checksums: bool = True
    skip_corrupt: bool = False


REBUILD = "restore it from a copy or re-run python -m data_pipeline.prepare to rebuild the shards"


def check_shard_files(directory: Path, split: SplitInfo) -> None:
    """Every shard of `split` is present with the manifest's byte size: a cheap check (nothing is read) for the
    start of a run. The sha256 is checked when the loader opens a shard, before any of its tokens are used."""
    for info in split.shards:
        path = directory / info.name
        if not path.is_file():
            raise DataPipelineError(f"shard {path} listed in the manifest is missing; {REBUILD}")
        size = path.stat().st_size
        if size != info.bytes:
            raise DataPipelineError(f"shard {path} has {size} bytes, the manifest says {info.bytes} (truncated or "
                                    f"replaced); {REBUILD}")


def _load_shard(path: Path, info: ShardInfo, options: ReadOptions, issues: IssueLog) -> bytes | None:
    """The shard's bytes, or None when it is corrupt and corrupt shards are skipped."""
    if not path.is_file():
        raise DataPipelineError(f"shard {path} listed in the manifest is missing; {REBUILD}")
    data = path.read_bytes()
    if options.verify_checksums:
        actual = hashlib.sha256(data).hexdigest()
        if actual != info.sha256:
            message = (f"shard {path} does not match its manifest checksum (sha256 {actual[:12]}..., "
                       f"expected {info.sha256[:12]}...; {len(data)} bytes, expected {info.bytes})")
            if not options.skip_corrupt:
                raise DataPipelineError(f"{message}; {REBUILD} (a PackedTokenDataset with skip_corrupt=True "
                                        "skips such shards)")
            issues.add("checksum_mismatch", f"{message}; shard skipped")
            return None
    return data


def read_shard(path: Path, info: ShardInfo, itemsize: int, options: ReadOptions,
               issues: IssueLog) -> Iterator[bytes]:
    """Yield the token bytes of each document in the shard, in stored order."""
    data = _load_shard(path, info, options, issues)
    if data is None:
        return

    def on_error(exn: Exception) -> bool:
        # webdataset appends context to exn.args (and " @ <stream repr>" to the first one); keep the message
        reason = str(exn.args[0]).split(" @ <")[0] if exn.args else type(exn).__name__
        issues.add("corrupt_tar", f"shard {path} is truncated or corrupt ({reason}); using its readable samples")
        return True  # keep going with what is readable

    source = [{"url": str(path), "stream": io.BytesIO(data)}]
    read = 0
    for sample in group_by_keys(tar_file_expander(source, handler=on_error), handler=on_error):
        tokens = sample.get(TOKENS_MEMBER)
        if tokens is None or len(tokens) % itemsize:
            issues.add("bad_sample", f"shard {path}: sample {sample['__key__']} has no whole token array; skipped")
        elif not tokens:
            issues.add("empty_document", f"shard {path}: sample {sample['__key__']} has no tokens; skipped")
        else:
            read += 1
            yield tokens
    if read < info.documents:
        issues.add("missing_documents", f"shard {path}: read {read} of {info.documents} documents",
                   n=info.documents - read)


def shuffled(items: Iterator[bytes], buffer_size: int, rng: np.random.Generator) -> Iterator[bytes]:
    """Bounded shuffle: once the buffer is full, each new item replaces a random buffered one, which is emitted."""
    buffer: list[bytes] = []
    picks = iter(())
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = next(picks, None)
        if j is None:
            picks = iter(rng.integers(0, buffer_size, RANDOM_BLOCK).tolist())
            j = next(picks)
        buffer[j], item = item, buffer[j]
        yield item
    for j in rng.permutation(len(buffer)).tolist():
        yield buffer[j]


def epoch_documents(directory: Path, split: SplitInfo, itemsize: int, seed: int, epoch: int,
                    buffer_size: int, options: ReadOptions, issues: IssueLog) -> Iterator[bytes]:
    """The documents of one epoch, in the (seed, epoch) order."""
    shard_rng, buffer_rng = (np.random.default_rng([seed, epoch, stream]) for stream in (0, 1))
    order = shard_rng.permutation(len(split.shards)).tolist()

    def in_shard_order() -> Iterator[bytes]:
        for i in order:
            info = split.shards[i]
            yield from read_shard(directory / info.name, info, itemsize, options, issues)

    return shuffled(in_shard_order(), buffer_size, buffer_rng)
