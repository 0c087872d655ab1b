"""manifest.json: the size and sha256 of every file of a checkpoint, written last; and its verification."""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from torch.distributed.checkpoint import Metadata
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from checkpoints.errors import CheckpointError
from checkpoints.safe_reader import MetadataError, SafeFileSystemReader
from checkpoints.state import CONFIG, RUN_STATE, rank_files

MANIFEST = "manifest.json"
METADATA = ".metadata"  # DCP's
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
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{directory} has checkpoint format {version!r}; this code reads format {FORMAT_VERSION}")
    if not _well_formed(manifest.get("files")):
        raise CheckpointError(f"{directory / MANIFEST} does not list files as this project writes them (name: bytes "
                              "and sha256): the checkpoint is damaged")
    return manifest


def _well_formed(files: object) -> bool:
    """{relative path inside the checkpoint: {"bytes": int, "sha256": str}}."""
    return isinstance(files, dict) and all(
        isinstance(info, dict) and type(info.get("bytes")) is int and isinstance(info.get("sha256"), str)
        and not Path(name).is_absolute() and ".." not in Path(name).parts for name, info in files.items())


def problems(directory: Path, checksums: bool = True) -> list[str]:
    """What is wrong with the checkpoint in `directory` (empty: it is complete and intact): a missing or damaged
    manifest, missing files, wrong sizes, with `checksums` wrong contents; and always what its files say of each
    other (consistency_problems). No tensor data is read. Without `checksums`, a changed byte that keeps every
    size (a bit flip in tensor data) goes unnoticed."""
    try:
        manifest = read_manifest(directory)
    except CheckpointError as e:
        return [str(e)]
    found = _file_problems(directory, manifest, checksums)
    return [f"{name}: {problem}" for name, problem in found.items()] + \
        consistency_problems(directory, manifest["files"], set(found))


def file_problems(directory: Path) -> list[str]:
    """The cheap part of problems(): a missing or damaged manifest, missing files and wrong sizes (one stat per
    file; what retention checks at every save)."""
    try:
        manifest = read_manifest(directory)
    except CheckpointError as e:
        return [str(e)]
    return [f"{name}: {problem}" for name, problem in _file_problems(directory, manifest, False).items()]


def _file_problems(directory: Path, manifest: dict, checksums: bool) -> dict[str, str]:
    return {name: problem for name, info in manifest["files"].items()
            if (problem := _file_problem(directory / name, info, checksums))}


def _file_problem(path: Path, info: dict, checksums: bool) -> str | None:
    if not path.is_file():
        return "missing"
    if path.stat().st_size != info["bytes"]:
        return f"{path.stat().st_size} bytes, the manifest says {info['bytes']} (truncated?)"
    if checksums and sha256(path) != info["sha256"]:
        return "sha256 differs from the manifest (corrupted)"
    return None


def consistency_problems(directory: Path, files: dict, reported: set[str]) -> list[str]:
    """What the files of the checkpoint in `directory` say of each other that is not so: a file every checkpoint
    holds (run state, config, DCP metadata, the rank files of the layout that saved it) not in the manifest
    (`files`); DCP metadata that the safe reader does not load, that places data in files the manifest does not
    list or past their ends, or whose chunks do not cover their tensors. The files named in `reported` (the
    manifest check found them missing or damaged) are not looked into."""
    found = [f"{name}: missing (not in the manifest; every checkpoint holds it)"
             for name in (RUN_STATE, CONFIG, METADATA) if name not in files]
    if RUN_STATE in files and RUN_STATE not in reported:
        found += _rank_file_problems(directory, files)
    if METADATA in files and METADATA not in reported:
        try:
            metadata = SafeFileSystemReader(str(directory)).read_metadata()
        except MetadataError as e:
            return found + [f"{METADATA}: {e.problem}"]
        found += _storage_problems(metadata, files, reported) + _coverage_problems(metadata)
    return found


def _rank_file_problems(directory: Path, files: dict) -> list[str]:
    """The rank files of every rank of the layout the run state names are in the manifest."""
    try:
        world_size = json.loads((directory / RUN_STATE).read_text())["layout"]["world_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{RUN_STATE}: not a run state of this project ({type(e).__name__}: {e})"]
    if type(world_size) is not int or not 0 < world_size <= len(files):
        return [f"{RUN_STATE}: its layout's world size {world_size!r} cannot have saved the {len(files)} files of "
                "the manifest"]
    return [f"{name}: missing (not in the manifest), though the run state says {world_size} rank(s) saved the "
            "checkpoint" for rank in range(world_size) for name in rank_files(rank) if name not in files]


def _storage_problems(metadata: Metadata, files: dict, reported: set[str]) -> list[str]:
    """Every storage item lies in a file of the manifest, within its size (one problem per file)."""
    found: dict[str, str] = {}
    for index, item in metadata.storage_data.items():
        name, end = item.relative_path, item.offset + item.length
        if name in found or name in reported:
            continue
        if name not in files:
            found[name] = f"missing (not in the manifest), though the metadata places {index.fqn} in it"
        elif end > files[name]["bytes"]:
            found[name] = (f"{files[name]['bytes']} bytes, but the metadata places {index.fqn} at bytes "
                           f"{item.offset}..{end} (truncated?)")
    return [f"{name}: {problem}" for name, problem in found.items()]


def _coverage_problems(metadata: Metadata) -> list[str]:
    stored = {(index.fqn, tuple(index.offset or ())) for index in metadata.storage_data}
    return [f"{METADATA}: {fqn}: {problem}" for fqn, entry in metadata.state_dict_metadata.items()
            if isinstance(entry, TensorStorageMetadata) and (problem := _chunk_problem(fqn, entry, stored))]


def _chunk_problem(fqn: str, entry: TensorStorageMetadata, stored: set[tuple[str, tuple]]) -> str | None:
    """The chunks of a tensor lie within it, each has a storage item, and together they hold all its elements."""
    covered = 0
    for chunk in entry.chunks:
        where = f"the chunk at {tuple(chunk.offsets)} of size {tuple(chunk.sizes)}"
        if any(o < 0 or s < 0 or o + s > n for o, s, n in zip(chunk.offsets, chunk.sizes, entry.size, strict=True)):
            return f"{where} lies outside the tensor's size {tuple(entry.size)}"
        if (fqn, tuple(chunk.offsets)) not in stored:
            return f"{where} has no storage item"
        covered += math.prod(chunk.sizes)
    if covered != entry.size.numel():
        return f"its chunks hold {covered} of its {entry.size.numel()} elements"
    return None


def verify(directory: Path, checksums: bool = True) -> None:
    """Raise CheckpointError listing every problem of the checkpoint in `directory`."""
    found = problems(directory, checksums)
    if found:
        raise CheckpointError(f"checkpoint {directory} is not usable: " + "; ".join(found))
