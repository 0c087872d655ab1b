"""Requeue the SLURM job this process runs in (`scontrol requeue $SLURM_JOB_ID`), after a stop signal."""
from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Mapping


def requeue_current_job(environ: Mapping[str, str], timeout_s: float = 30.0) -> bool:
    """Ask SLURM to requeue the job named by SLURM_JOB_ID; False (and nothing done) outside SLURM or when
    scontrol is missing or refuses (the job was submitted without --requeue, or requeueing is off)."""
    job = environ.get("SLURM_JOB_ID")
    if not job or shutil.which("scontrol") is None:
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"scontrol requeue {job} did not answer within {timeout_s:.0f} s", file=sys.stderr)
        return False
    if done.returncode != 0:
        print(f"scontrol requeue {job} failed: {done.stderr.strip()}", file=sys.stderr)
    return done.returncode == 0
