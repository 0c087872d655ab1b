"""Where checkpoints live in a run directory, and which of them to keep."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from checkpoints.manifest import file_problems

LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def temporary_dir(root: Path, step: int) -> Path:
    return root / f"{TMP_PREFIX}{step_name(step)}"


def step_of(path: Path) -> int | None:
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def step_dirs(root: Path) -> list[Path]:
    """The checkpoint directories under `root`, newest (highest step) first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of, reverse=True)


def write_latest(root: Path, directory: Path) -> None:
    """Point `latest` at `directory`, atomically (write a temporary file, then rename over)."""
    tmp = root / f"{TMP_PREFIX}{LATEST}"
    tmp.write_text(directory.name + "\n")
    os.replace(tmp, root / LATEST)


def read_latest(root: Path) -> Path | None:
    try:
        name = (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    return root / name if _STEP_DIR.match(name) else None


def publish(tmp: Path, final: Path) -> None:
    """Rename a completely written temporary checkpoint into place, then point `latest` at it. A directory of
    the same step left by an earlier attempt (a run that restarted from an older checkpoint) is replaced."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    write_latest(final.parent, final)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial(root: Path) -> list[Path]:
    """Delete the temporary directories of saves that never completed; returns them."""
    if not root.is_dir():
        return []
    partial = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(TMP_PREFIX)]
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


def to_delete(steps: list[int], keep_last: int, keep_every: int, protect: set[int]) -> list[int]:
    """The steps retention drops: all but the newest keep_last (0: keep all), except multiples of keep_every
    and the protected ones (what `latest` names)."""
    if keep_last == 0:
        return []
    newest = set(sorted(steps, reverse=True)[:keep_last])
    return [s for s in steps
            if s not in newest and s not in protect and not (keep_every and s % keep_every == 0)]


def prune(root: Path, keep_last: int, keep_every: int) -> tuple[list[Path], list[Path]]:
    """Apply retention to the checkpoints under `root` whose files are intact (all there with the manifest's
    sizes: one stat per file at every save; hashes and metadata are `--resume`'s and `verify`'s job, and
    `--resume auto` sets aside the damaged ones it finds): a damaged checkpoint neither counts among the newest
    keep_last nor is deleted, so retention never removes the newest intact checkpoint while keeping a damaged
    one. Returns (removed directories, damaged ones left in place)."""
    latest = read_latest(root)
    intact, damaged = {}, []
    for p in step_dirs(root):
        if file_problems(p):
            damaged.append(p)
        else:
            intact[step_of(p)] = p
    protect = {step_of(latest)} if latest is not None else set()
    removed = [intact[s] for s in to_delete(list(intact), keep_last, keep_every, protect)]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed, damaged


def set_aside(path: Path, suffix: str) -> Path:
    """Rename `path` to <its name>.<suffix> (then -2, -3, ... when taken) beside it, out of the names that
    resuming and retention look at; nothing is deleted. Returns the new path."""
    target, n = path.with_name(f"{path.name}.{suffix}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{suffix}-{n}")
    os.replace(path, target)
    return target
