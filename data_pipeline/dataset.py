"""PackedTokenDataset: a torch IterableDataset of packed, exactly resumable token batches.

One global stream per (seed, epoch), the same for every DP size and worker count:
  shards in a seeded order -> documents through a seeded bounded shuffle buffer -> each document
  followed by eos, all concatenated -> global sample i = tokens [i*seq_len, i*seq_len + seq_len + 1).
Consecutive samples overlap by one token, so every token is a prediction target exactly once.
Global step s takes samples [consumed + s*G, consumed + (s+1)*G), G = micro_batch * dp_size;
DP rank r takes the contiguous slice r*micro_batch ... (r+1)*micro_batch - 1 of it. DataLoader worker
w of W makes this rank's batches w, w+W, ...; torch's DataLoader returns them in order.
An epoch ends when the stream cannot fill a whole global step (the tail is dropped).

The resume state is (epoch, global samples consumed in it) and says nothing about DP size or
workers, so a resume on any DP size / worker count continues the same global stream exactly.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import DataPipelineError
from .issues import IssueLog
from .manifest import Manifest
from .packing import TokenStream
from .shards import ReadOptions, epoch_documents

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderConfig:
    data_dir: str  # directory holding manifest.json (written by data_pipeline.prepare)
    seq_len: int
    micro_batch: int
    split: str = "train"
    seed: int = 0
    shuffle_buffer: int = 1024  # documents
    loop: bool = True  # continue with the next epoch; False: stop at the end of the current one
    verify_checksums: bool = True
    skip_corrupt: bool = False  # skip shards failing their checksum instead of raising

    def validate(self) -> None:
        for name in ("seq_len", "micro_batch", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise DataPipelineError(f"loader {name} must be >= 1, got {getattr(self, name)}")


class PackedTokenDataset(IterableDataset):
    """Yields dicts for one DP rank:

    * ``tokens``: int64 (micro_batch, seq_len + 1); inputs are ``tokens[:, :-1]``, targets ``tokens[:, 1:]``.
    * ``doc_start``: bool (micro_batch, seq_len); True where input position p holds the first token
      of a document (reset memory state there). Position 0 is True only when a document really
      starts there; a document continuing from the previous window is not a start.
    * ``meta``: {"epoch", "consumed_samples" (global, after this step), "issues" (counts by kind)}.

    DP rank and size are given explicitly (torch.distributed is not consulted).
    Iterate through `loader()` so that `state_dict()` follows what was delivered, with any worker count.
    """

    def __init__(self, config: LoaderConfig, dp_rank: int = 0, dp_size: int = 1) -> None:
        super().__init__()
        config.validate()
        if not 0 <= dp_rank < dp_size:
            raise DataPipelineError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1} (dp_size {dp_size})")
        self.config = config
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.manifest = Manifest.load(config.data_dir)
        self.split = self.manifest.split(config.split)
        self.dtype = np.dtype(self.manifest.dtype)
        self.issues = IssueLog(log)
        self.epoch = 0
        self.consumed_samples = 0  # global samples of `epoch` already delivered

    # --- resume state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed_samples": self.consumed_samples, "seed": self.config.seed,
                "seq_len": self.config.seq_len, "split": self.config.split,
                "data_fingerprint": self.split.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        missing = sorted(set(mine) - set(state))
        if missing:
            raise DataPipelineError(f"loader state lacks {missing}; pass a dict saved by state_dict()")
        for key in ("seed", "seq_len", "split", "data_fingerprint"):
            if state[key] != mine[key]:
                raise DataPipelineError(f"loader state was saved with {key}={state[key]!r}, this loader has "
                                        f"{mine[key]!r}; an exact resume needs the same seed, seq_len, split "
                                        "and data (start a fresh run to change them)")
        self.epoch, self.consumed_samples = int(state["epoch"]), int(state["consumed_samples"])

    def loader(self, num_workers: int = 0, pin_memory: bool = False) -> ResumableLoader:
        return ResumableLoader(self, num_workers, pin_memory)

    # --- iteration -------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is not None:  # a DataLoader worker; the main process records state (ResumableLoader)
            yield from self._batches(info.id, info.num_workers)
            return
        start_epoch = self.epoch
        for batch in self._batches(0, 1):
            self._record(batch["meta"])
            yield batch
        self._end_epoch(start_epoch)

    def _record(self, meta: dict[str, Any]) -> None:
        self.epoch, self.consumed_samples = meta["epoch"], meta["consumed_samples"]

    def _end_epoch(self, epoch: int) -> None:
        """A finished `loop=False` pass leaves the state at the start of the next epoch."""
        self.epoch, self.consumed_samples = epoch + 1, 0

    def _batches(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        cfg = self.config
        length, mb = cfg.seq_len, cfg.micro_batch
        per_step = mb * self.dp_size
        epoch, consumed = self.epoch, self.consumed_samples
        local = 0  # this rank's batches since the iteration began; worker w makes those with local % W == w
        options = ReadOptions(cfg.verify_checksums, cfg.skip_corrupt)
        while True:
            documents = epoch_documents(Path(cfg.data_dir), self.split, self.dtype.itemsize, cfg.seed, epoch,
                                        cfg.shuffle_buffer, options, self.issues)
            stream = TokenStream(documents, self.dtype, self.manifest.eos_id)
            stream.release(consumed * length)
            step = 0
            # A step exists only if the whole global step fits, so all ranks agree on the epoch length.
            while stream.reaches((consumed + (step + 1) * per_step) * length + 1):
                if local % workers == worker:
                    first = consumed + step * per_step + self.dp_rank * mb
                    tokens, starts = stream.read(first * length, (first + mb) * length + 1)
                    yield self._batch(tokens, starts, epoch, consumed + (step + 1) * per_step)
                local += 1
                step += 1
                stream.release((consumed + step * per_step) * length)
            if step == 0 and consumed == 0:
                raise DataPipelineError(
                    f"split {cfg.split!r} ({self.split.tokens} tokens in {self.split.documents} documents) cannot "
                    f"fill one global step of {per_step} samples x {length} tokens; lower micro_batch, seq_len "
                    "or dp_size, or add data")
            if not cfg.loop:
                return
            epoch, consumed = epoch + 1, 0

    def _batch(self, tokens: np.ndarray, starts: np.ndarray, epoch: int, consumed: int) -> dict[str, Any]:
        length, mb, size = self.config.seq_len, self.config.micro_batch, self.dtype.itemsize
        windows = np.lib.stride_tricks.as_strided(tokens, (mb, length + 1), (length * size, size))
        return {"tokens": torch.from_numpy(windows.astype(np.int64)),
                "doc_start": torch.from_numpy(starts[:mb * length].reshape(mb, length)),
                "meta": {"epoch": epoch, "consumed_samples": consumed, "issues": dict(self.issues.counts)}}


class ResumableLoader:
    """A torch DataLoader over a PackedTokenDataset that keeps the dataset's resume state in step
    with the batches delivered (workers run ahead; only delivered batches count)."""

    def __init__(self, dataset: PackedTokenDataset, num_workers: int = 0, pin_memory: bool = False) -> None:
        self.dataset = dataset
        # persistent_workers=False: each iteration starts workers from the dataset's current state.
        self.loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                 persistent_workers=False)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.loader.num_workers == 0:  # the dataset runs in this process and records its own state
            yield from self.loader
            return
        start_epoch = self.dataset.epoch
        try:
            for batch in self.loader:
                self.dataset._record(batch["meta"])
                self.dataset.issues.merge_max(batch["meta"]["issues"])
                yield batch
        except DataPipelineError as e:
            raise DataPipelineError(_worker_message(e)) from None
        self.dataset._end_epoch(start_epoch)


def _worker_message(error: DataPipelineError) -> str:
    """torch re-raises a worker's error with the worker's traceback in the message; keep the message."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    return text.rsplit(f"{type(error).__name__}: ", 1)[-1].strip()
