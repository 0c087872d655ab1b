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
from train_helpers import REPO, run_in_process, run_torchrun, tiny_run_config

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


def test_stop_signal_saves_stops_and_resumes_exactly(data, tmp_path):
    """SIGUSR1 (SLURM's warning before the time limit) under torchrun: every rank saves at the end of the same
    step and exits with status 75; --resume auto then ends where the uninterrupted run ends, bit for bit."""
    config = tiny_run_config(tmp_path / "run.toml", data, tmp_path / "runs")
    common = [f"--config={config}", "--train.train_steps=40", "--train.eval_batches=0"]
    straight = run_torchrun(common + ["--train.run_name=straight", "--checkpoint.save_final=false"],
                            tmp_path / "straight.pt")
    run_dir = tmp_path / "runs" / "signalled"
    argv = common + ["--train.run_name=signalled", "--resume=auto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "launch.train", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while train_records(run_dir) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "launch.train"], capture_output=True, text=True)
    rank0 = int(workers.stdout.split()[0])  # one rank is signalled; the other learns it from the step's vote
    os.kill(rank0, signal.SIGUSR1)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0  # torchrun reports the workers' status 75 as a failure
    assert "exitcode  : 75" in output, output[-3000:]
    stopped_at = train_records(run_dir)
    assert 3 <= stopped_at < 40
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "manifest.json").is_file()
    resumed = run_torchrun(argv, tmp_path / "resumed.pt")
    assert resumed["steps"][0]["step"] == stopped_at + 1
    assert [s["loss"] for s in resumed["steps"]] == [s["loss"] for s in straight["steps"][stopped_at:]]
    for name, value in straight["params"].items():
        assert torch.equal(resumed["params"][name], value), name
