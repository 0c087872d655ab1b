"""Helpers for the checkpoint tests: the saved run's handles, and ways to damage a checkpoint."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

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
