"""Fault injection: a run killed with SIGKILL at 20 random points, many of them inside a save (shards, manifest,
rename, retention), resumes each time from a valid checkpoint and ends with parameters bit-identical to the
uninterrupted run."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import dump_run
from train_helpers import REPO, run_in_process, tiny_run_config

STEPS, KILLS = 60, 20


def train_records(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.endswith("}") and json.loads(line)["group"] == "train")


def kill_after_progress(argv: list[str], run_dir: Path, delay: float, timeout: float = 120) -> bool:
    """Start the run, wait for its first new step, SIGKILL it `delay` seconds later; False if it ended first."""
    before = train_records(run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, dump_run.__file__, *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while train_records(run_dir) == before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is not None:
        assert proc.returncode == 0, proc.stderr.read()[-3000:]
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def test_sigkill_at_random_points_resumes_to_the_same_parameters(data, tmp_path):
    config = tiny_run_config(tmp_path / "run.toml", data, tmp_path / "runs")
    common = [f"--config={config}", f"--train.train_steps={STEPS}", "--train.eval_batches=0"]
    straight = run_in_process(common + ["--train.run_name=straight", "--checkpoint.save_final=false"],
                              tmp_path / "straight.pt")
    run_dir = tmp_path / "runs" / "faulty"
    faulty = common + ["--train.run_name=faulty", "--resume=auto", "--checkpoint.save_interval=1",
                       "--checkpoint.keep_last=2", "--out", str(tmp_path / "faulty.pt")]
    rng = random.Random(0)
    kills, inside_save = 0, 0
    for _ in range(KILLS):
        if not kill_after_progress(faulty, run_dir, delay=rng.uniform(0.0, 0.4)):
            break
        kills += 1
        inside_save += any(p.name.startswith(".tmp-") for p in (run_dir / "checkpoints").iterdir())
    dump_run.main(faulty)  # the last resume runs to the end
    resumed = torch.load(tmp_path / "faulty.pt")
    assert kills == KILLS, f"only {kills} kills landed before the run ended; lengthen the run"
    assert inside_save >= 1, f"none of the {kills} kills hit a save in progress"
    assert resumed["params"].keys() == straight["params"].keys()
    for name, value in straight["params"].items():
        assert torch.equal(resumed["params"][name], value), name
    print(f"{kills} kills, {inside_save} inside a save")
