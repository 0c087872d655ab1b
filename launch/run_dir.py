"""The run directory (runs_dir/run_name): which one a run uses, whether it can be written, and the lock that
keeps a second run out of it.

The lock is an flock(2) that rank 0 holds on runs_dir/run_name/.lock for the run's life; the kernel releases it
when the holder exits or dies, so a lock left by a killed run is free again at once. The file holds the holder's
host, pid and start time for the message that refuses a second run. On a file system without flock support the
run goes on unlocked, with a warning."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from megatron_hope.config import Config
from megatron_hope.config_base import ConfigError

LOCK_FILE = ".lock"


def run_directory(cfg: Config, config_path: str) -> Path:
    """runs_dir/run_name; without a name, <config stem>-<date>-<time>[-N], the first that is free. An existing
    run directory is used only by checkpoint.resume = "auto" (continue it) or "none" (start it again)."""
    runs = Path(cfg.train.runs_dir)
    if cfg.train.run_name:
        if (runs / cfg.train.run_name).exists() and cfg.checkpoint.resume not in ("auto", "none"):
            raise ConfigError(f"train.run_name: {runs / cfg.train.run_name} already exists; continue it with "
                              "--resume auto, start it again from step 0 with --resume none, or choose another name")
        return runs / cfg.train.run_name
    base = f"{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, n = runs / base, 1
    while run_dir.exists():
        n += 1
        run_dir = runs / f"{base}-{n}"
    return run_dir


def check_writable(run_dir: Path) -> None:
    """ConfigError unless the run directory (or, before it exists, its nearest existing parent) and its
    checkpoints/ can be written: a read-only file system or missing permissions stop the run before it starts."""
    for path in (run_dir / "checkpoints", run_dir):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{path} is a file, where the run needs a directory; move it away or set "
                              "train.runs_dir / train.run_name elsewhere")
    existing = next(p for p in (run_dir / "checkpoints", *(run_dir / "checkpoints").parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        why = ("its file system is mounted read-only" if os.statvfs(existing).f_flag & os.ST_RDONLY
               else "no write permission")
        raise ConfigError(f"cannot write the run directory {run_dir}: {existing} is not writable ({why}); set "
                          "train.runs_dir to a writable directory")


class RunDirectoryInUse(ConfigError):
    """Another live run holds the run directory."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None
        self.warning: str | None = None  # set when the file system cannot lock

    def acquire(self) -> RunLock:
        """Take the lock (creating the run directory), or raise RunDirectoryInUse naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirectoryInUse(f"{self.path.parent} is in use by another run ({self._holder()}); wait for it "
                                    "to end or stop it, or give this run another train.run_name") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            self.warning = (f"{self.path.parent}: the file system does not support locks ({e.strerror}); nothing "
                            "stops a second run from using this run directory at the same time")
            return self
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        self.fd = fd
        return self

    def _holder(self) -> str:
        try:
            holder = json.loads(self.path.read_text())
            return f"host {holder['host']}, pid {holder['pid']}, since {holder['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "its host and pid are not recorded yet"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None
