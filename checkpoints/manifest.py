"""manifest.json: the size and sha256 of every file of a checkpoint, written last; and its verification."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from checkpoints.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, step: int) -> dict:
    """Checksum every file under `directory` and write manifest.json (fsynced) after them."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[str(path.relative_to(directory))] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files}
    target = directory / MANIFEST
    with open(target, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def read_manifest(directory: Path) -> dict:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no {MANIFEST}: the save did not complete") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{directory / MANIFEST} is not valid JSON ({e}): the checkpoint is damaged") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory} has checkpoint format {manifest.get('format_version')!r}; this code "
                              f"reads format {FORMAT_VERSION}")
    return manifest


def problems(directory: Path, checksums: bool = True) -> list[str]:
    """What is wrong with the checkpoint in `directory` (empty: it is complete and intact): a missing or damaged
    manifest, missing files, wrong sizes, and with `checksums` wrong contents."""
    try:
        manifest = read_manifest(directory)
    except CheckpointError as e:
        return [str(e)]
    found = []
    for name, info in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            found.append(f"{name}: missing")
        elif path.stat().st_size != info["bytes"]:
            found.append(f"{name}: {path.stat().st_size} bytes, the manifest says {info['bytes']} (truncated?)")
        elif checksums and sha256(path) != info["sha256"]:
            found.append(f"{name}: sha256 differs from the manifest (corrupted)")
    return found


def verify(directory: Path, checksums: bool = True) -> None:
    """Raise CheckpointError listing every problem of the checkpoint in `directory`."""
    found = problems(directory, checksums)
    if found:
        raise CheckpointError(f"checkpoint {directory} is not usable: " + "; ".join(found))
