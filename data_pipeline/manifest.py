"""The manifest written by `prepare` and read by the loader: shards per split with counts and sha256.

Shard format: webdataset tar files; one sample per document, keyed by its zero-padded document
index, holding one member `<key>.tokens` = the document's token ids as raw little-endian integers
of `dtype` (no eos; the loader appends it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataPipelineError

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
TOKENS_MEMBER = "tokens"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned little-endian dtype that holds every id of the vocabulary."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name, relative to the manifest's directory
    documents: int
    tokens: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    shards: list[ShardInfo]

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def fingerprint(self) -> str:
        """Identifies the exact shard contents (for checking that a resume uses the same data)."""
        return hashlib.sha256("".join(s.sha256 for s in self.shards).encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    dtype: str  # numpy dtype string, e.g. "<u2"
    vocab_size: int
    eos_id: int
    bos_id: int
    pad_id: int
    tokenizer_sha256: str
    val_fraction: float
    split_seed: int
    splits: dict[str, SplitInfo]
    issues: dict[str, int] = field(default_factory=dict)  # bad input counted by prepare
    format: int = FORMAT_VERSION

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DataPipelineError(f"split {name!r} is not in the manifest; choose one of {sorted(self.splits)}")
        return self.splits[name]

    def save(self, directory: Path) -> None:
        """Write atomically, so a crashed prepare never leaves a half-written manifest."""
        tmp = directory / (MANIFEST_FILE + ".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")
        os.replace(tmp, directory / MANIFEST_FILE)

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        path = Path(directory) / MANIFEST_FILE
        fix = "run python -m data_pipeline.prepare --out DIR first and pass that DIR"
        if not path.is_file():
            raise DataPipelineError(f"no manifest at {path}; {fix}")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT_VERSION:
                raise DataPipelineError(f"{path} has format {raw.get('format')!r}, this code reads "
                                        f"{FORMAT_VERSION}; re-run python -m data_pipeline.prepare")
            raw["splits"] = {name: SplitInfo([ShardInfo(**s) for s in split["shards"]])
                             for name, split in raw["splits"].items()}
            return cls(**raw)
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
            raise DataPipelineError(f"{path} is not a valid manifest ({type(e).__name__}: {e}); {fix}") from None
