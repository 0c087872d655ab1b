"""Helpers for the checkpoint tests: the saved run's handles, and ways to damage a checkpoint or to plant a
payload in its metadata."""
from __future__ import annotations

import json
import os
import pickle
import pickletools
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import Metadata

from checkpoints.manifest import write_manifest

STEPS = 5  # saves after steps 1..5; keep_last 2, keep_every 2 leave 2, 4 and 5


@dataclass
class SavedRun:
    argv: list[str]  # the run's command line, without --train.run_name
    config: Path  # its TOML
    result: dict  # run_in_process's: "steps", "params" (final full parameters), "run_dir"
    root: Path  # its checkpoints/ directory

    @property
    def newest(self) -> Path:
        return self.root / f"step_{STEPS:08d}"

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self.result["params"]


def shard(directory: Path) -> Path:
    return next(directory.glob("*.distcp"))


def flip_byte(directory: Path) -> str:
    """Invert one byte in the middle of a model/optimizer shard; returns the shard's name."""
    path = shard(directory)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path.name


def truncate(directory: Path) -> str:
    path = shard(directory)
    path.write_bytes(path.read_bytes()[:-100])
    return path.name


def delete_manifest(directory: Path) -> str:
    (directory / "manifest.json").unlink()
    return "manifest.json"


def damaged_copy(checkpoint: Path, into: Path, damage) -> tuple[Path, str]:
    """A copy of `checkpoint` under `into` with damage(copy) applied; and what damage() names."""
    copy = into / checkpoint.name
    shutil.copytree(checkpoint, copy)
    return copy, damage(copy)


def metadata(directory: Path) -> Metadata:
    """The checkpoint's DCP metadata, read with pickle: for the tests' own checkpoints only."""
    return pickle.loads((directory / ".metadata").read_bytes())


def rewrite(directory: Path, change: Callable[[Path], None]) -> None:
    """Apply change(directory), then write the manifest again: what anyone who can write the checkpoint can do."""
    change(directory)
    write_manifest(directory, json.loads((directory / "run_state.json").read_text())["step"])


def rewrite_metadata(directory: Path, change: Callable[[Metadata], None]) -> None:
    def apply(d: Path) -> None:
        md = metadata(d)
        change(md)
        (d / ".metadata").write_bytes(pickle.dumps(md))
    rewrite(directory, apply)


def text_opcodes(value: str) -> bytes:
    data = value.encode()
    assert len(data) < 256
    return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data


def global_opcodes(module: str, name: str) -> bytes:
    """Pickle opcodes that push module.name (`name` may be dotted: protocol 4 follows it)."""
    return text_opcodes(module) + text_opcodes(name) + pickle.STACK_GLOBAL


def call_opcodes(module: str, name: str, *args: str) -> bytes:
    """Pickle opcodes that, unpickled, call module.name(*args)."""
    return global_opcodes(module, name) + pickle.MARK + b"".join(map(text_opcodes, args)) + pickle.TUPLE + \
        pickle.REDUCE


def _without_frames(data: bytes) -> bytes:
    """The pickle without its FRAME opcodes (optional; their lengths are wrong once opcodes are spliced in)."""
    frames = [pos for op, _, pos in pickletools.genops(data) if op.name == "FRAME"]
    for pos in reversed(frames):
        data = data[:pos] + data[pos + 9:]
    return data


def plant(directory: Path, opcodes: bytes) -> None:
    """Splice `opcodes` into the checkpoint's .metadata as the value of planner_data (so that the rest still
    loads as DCP metadata) and write the manifest again."""
    placeholder = "planted-payload"

    def apply(d: Path) -> None:
        md = metadata(d)
        md.planner_data = placeholder
        data = pickle.dumps(md, protocol=4)
        assert data.count(text_opcodes(placeholder)) == 1
        (d / ".metadata").write_bytes(_without_frames(data.replace(text_opcodes(placeholder), opcodes)))
    rewrite(directory, apply)


class MakesDirectory:
    """Unpickled (by a pickle.load or torch.load(weights_only=False)), creates the directory `path`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)
