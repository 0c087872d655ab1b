"""A run never loses or silently discards its checkpoints, and bad input after the start is one line:
a save in flight completes when training fails; `--resume auto` refuses a run whose checkpoints are all damaged;
retention never deletes the newest intact checkpoint; one run at a time per run directory; an unwritable or
full checkpoint directory; Ctrl-C; damaged data shards; resuming with another data stream or from a directory
that is not a checkpoint."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoints.errors import CheckpointError
from checkpoints.layout import prune, step_dirs, step_name
from checkpoints.manager import CheckpointManager
from checkpoints.manifest import problems
from checkpoints.state import estimated_checkpoint_bytes
from data_pipeline.errors import DataPipelineError
from launch.env import ProcessEnv
from launch.train import prepare, train
from megatron_hope.config import load
from megatron_hope.config_base import ConfigError
from train_helpers import REPO, run_in_process, tiny_run_config

ONE = ProcessEnv(rank=0, world_size=1, local_rank=0)


def launch_train(argv: list[str], timeout: float = 300, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """`python -m launch.train ARGV` as a user runs it (Popen when `popen` holds its options)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "launch.train", *argv]
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, env=env, text=True, **popen)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def one_error_line(stderr: str) -> str:
    """The one `error: ...` line of a run that failed with a known error (beside the progress bar); no
    traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def damaged_data(data: dict[str, Path], into: Path, split: str, damage: str) -> tuple[Path, Path]:
    """A copy of the test corpus whose first `split` shard is damaged ("flip": a byte inverted, same size;
    "truncate"; "delete"); returns (its manifest, the damaged shard)."""
    shards = into / "shards"
    shutil.copytree(data["manifest"].parent, shards)
    manifest = shards / "manifest.json"
    shard = shards / json.loads(manifest.read_text())["splits"][split]["shards"][0]["name"]
    raw = bytearray(shard.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
        shard.write_bytes(bytes(raw))
    elif damage == "truncate":
        shard.write_bytes(bytes(raw[:-512]))
    else:
        shard.unlink()
    return manifest, shard


@pytest.fixture(scope="module")
def config(data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    return tiny_run_config(root / "tiny.toml", data, root / "unused-runs")


def argv(config: Path, runs: Path, name: str, *more: str) -> list[str]:
    return [f"--config={config}", f"--train.runs_dir={runs}", f"--train.run_name={name}", *more]


# --- item 2: a save in flight completes on every exit path ------------------------------------------------------

def test_a_failing_final_evaluation_does_not_abandon_the_final_async_save(config, data, tmp_path, monkeypatch):
    """The final evaluation reads a damaged val shard after the final (async) save started; the save completes
    before the error leaves train(), even when its background writing is slow."""
    manifest, shard = damaged_data(data, tmp_path, "val", "flip")
    finish = CheckpointManager._finish

    def slow_finish(self, *args):
        time.sleep(1.0)
        finish(self, *args)

    monkeypatch.setattr(CheckpointManager, "_finish", slow_finish)
    run = prepare(argv(config, tmp_path / "runs", "evalfail", f"--data.val_manifest={manifest}"), ONE)
    with pytest.raises(DataPipelineError, match=f"shard {shard} does not match its manifest checksum"):
        train(run, None)
    root = run.run_dir / "checkpoints"
    assert [p.name for p in root.iterdir() if p.is_dir()] == [step_name(5)]
    assert problems(root / step_name(5)) == []


def test_the_command_line_reports_the_damaged_shard_in_one_line_and_keeps_the_checkpoint(config, data, tmp_path):
    manifest, shard = damaged_data(data, tmp_path, "val", "flip")
    proc = launch_train(argv(config, tmp_path / "runs", "evalfail", f"--data.val_manifest={manifest}"))
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert f"shard {shard} does not match its manifest checksum" in line and "data_pipeline.prepare" in line
    root = tmp_path / "runs" / "evalfail" / "checkpoints"
    assert [p.name for p in root.iterdir() if p.is_dir()] == [step_name(5)]
    assert problems(root / step_name(5)) == []


# --- item 3: all checkpoints damaged; retention ------------------------------------------------------------------

def flip_shard_byte(checkpoint: Path) -> None:
    shard = next(checkpoint.glob("*.distcp"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def three_steps(config, tmp_path) -> tuple[list[str], dict]:
    """A 3-step run saving every step (keeping 2), and its results."""
    common = argv(config, tmp_path / "runs", "r", "--train.train_steps=3", "--train.eval_batches=0",
                  "--checkpoint.save_interval=1", "--checkpoint.keep_last=2", "--optim.warmup_steps=1")
    return common, run_in_process(common, tmp_path / "first.pt")


def test_resume_auto_refuses_when_every_checkpoint_is_damaged_and_resume_none_starts_again(three_steps, tmp_path):
    common, first = three_steps
    root = tmp_path / "runs" / "r" / "checkpoints"
    assert [p.name for p in step_dirs(root)] == [step_name(3), step_name(2)]
    for checkpoint in step_dirs(root):
        flip_shard_byte(checkpoint)
    before = snapshot(root)
    proc = launch_train(common + ["--resume=auto"])
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "every checkpoint of r is damaged" in line and "nothing was loaded or changed" in line
    assert f"{step_name(3)}: __0_0.distcp: sha256 differs" in line and f"{step_name(2)}:" in line
    assert "--resume none" in line
    assert snapshot(root) == before  # nothing renamed, removed or written

    again = run_in_process(common + ["--resume=none"], tmp_path / "again.pt")
    assert [s["loss"] for s in again["steps"]] == [s["loss"] for s in first["steps"]]  # from step 0, as before
    (aside,) = [p for p in root.parent.iterdir() if p.name.startswith("checkpoints.set-aside-")]
    assert snapshot(aside) == before  # the damaged checkpoints are kept, untouched
    assert [p.name for p in step_dirs(root)] == [step_name(3), step_name(2)]
    assert all(problems(p) == [] for p in step_dirs(root))


def test_a_damaged_newest_checkpoint_is_set_aside_when_resuming_past_it(three_steps, tmp_path):
    """--resume auto skips a corrupted step 3, resumes at step 2 and sets step 3 aside (renamed, bytes kept), so
    that it can neither be counted by retention nor be mistaken for this run's newest checkpoint."""
    common, first = three_steps
    root = tmp_path / "runs" / "r" / "checkpoints"
    flip_shard_byte(root / step_name(3))
    damaged = snapshot(root / step_name(3))
    resumed = run_in_process(common + ["--resume=auto"], tmp_path / "resumed.pt")
    assert [s["step"] for s in resumed["steps"]] == [3]
    assert resumed["steps"][0]["loss"] == first["steps"][2]["loss"]
    assert snapshot(root / f"{step_name(3)}.damaged") == damaged
    assert problems(root / step_name(3)) == []
    log = (root.parent / "train.log").read_text()
    assert f"set aside as {step_name(3)}.damaged" in log


def test_retention_keeps_the_newest_intact_checkpoint_and_never_deletes_a_damaged_one(three_steps, tmp_path):
    """A damaged step 6 newer than an intact step 3, keep_last 1: retention used to keep step 6 (the newest)
    and delete step 3, the only usable one."""
    root = tmp_path / "runs" / "r" / "checkpoints"
    shutil.rmtree(root / step_name(2))
    shutil.copytree(root / step_name(3), root / step_name(6))
    shard = next((root / step_name(6)).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    (root / "latest").write_text(step_name(6) + "\n")
    removed, damaged = prune(root, keep_last=1, keep_every=0)
    assert removed == [] and damaged == [root / step_name(6)]
    assert [p.name for p in step_dirs(root)] == [step_name(6), step_name(3)]


# --- item 5: one run per run directory -------------------------------------------------------------------------

def wait_for_training(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and '"group": "train"' in metrics.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not start training (exit {proc.poll()})")


def test_a_second_run_in_the_same_run_directory_is_refused_naming_the_first(config, tmp_path):
    run_dir = tmp_path / "runs" / "shared"
    common = argv(config, tmp_path / "runs", "shared", "--train.train_steps=400", "--train.eval_batches=0",
                  "--resume=auto")
    first = launch_train(common, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_training(run_dir, first)
        metrics = (run_dir / "metrics.jsonl").read_text()
        second = launch_train(common)
        assert second.returncode == 2
        line = one_error_line(second.stderr)
        assert f"{run_dir} is in use by another run (host {socket.gethostname()}, pid {first.pid}, since " in line
        assert (run_dir / "metrics.jsonl").read_text().startswith(metrics)  # the second run wrote nothing
        assert first.poll() is None  # and did not disturb the first
    finally:
        first.kill()  # SIGKILL: the first run dies holding the lock
        first.wait()
    third = launch_train(common[:3] + ["--train.train_steps=2", "--train.eval_batches=0", "--resume=auto"])
    assert third.returncode == 0, third.stderr[-3000:]  # a dead run's lock is free


# --- item 6: unwritable or full checkpoint directory ---------------------------------------------------------------

NO_MOUNT = 99


def mount_namespace_runs(tmp_path: Path, options: str, python_argv: list[str]) -> tuple[subprocess.CompletedProcess,
                                                                                        list[str]]:
    """Run `python -m launch.train` in a private mount namespace where runs/ is a tmpfs with `options`; returns
    the process and what its run's checkpoints/ directory holds afterwards (the tmpfs goes with the namespace)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a small or read-only file system")
    runs = tmp_path / "runs"
    runs.mkdir(exist_ok=True)
    script = (f"mount -t tmpfs -o {options} tmpfs {runs} || exit {NO_MOUNT}; "
              f"{shlex.join([sys.executable, '-m', 'launch.train', *python_argv])}; rc=$?; "
              f"echo; echo checkpoints: $(ls -A {runs}/*/checkpoints 2>/dev/null); exit $rc")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == NO_MOUNT:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    listing = proc.stdout.rsplit("checkpoints:", 1)[-1].split()
    return proc, listing


def test_a_read_only_run_directory_is_refused_before_training(config, tmp_path):
    proc, _ = mount_namespace_runs(tmp_path, "ro,size=1m", argv(config, tmp_path / "runs", "ro"))
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert f"cannot write the run directory {tmp_path / 'runs' / 'ro'}" in line
    assert "its file system is mounted read-only" in line and "train.runs_dir" in line


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_fails_the_save_in_one_line_and_keeps_the_previous_checkpoint(config, tmp_path, async_save):
    """runs/ holds about 1.5 checkpoints: the first save fits, the second fails with ENOSPC; the run warns at
    the start, stops with one line naming the cause, removes the partial save and keeps step 1."""
    size_kib = int(estimated_checkpoint_bytes(load(str(config))) * 1.5 / 1024) + 200  # + logs and tensorboard
    proc, listing = mount_namespace_runs(tmp_path, f"size={size_kib}k", argv(
        config, tmp_path / "runs", "full", "--checkpoint.save_interval=1", "--checkpoint.keep_last=3",
        f"--checkpoint.async_save={str(async_save).lower()}", "--train.eval_batches=0"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert "saving checkpoint step_00000002" in line and "No space left on device (errno 28)" in line
    assert "the partial save was removed and earlier checkpoints are untouched" in line
    assert "warning: checkpoints take about" in proc.stdout and "saves may fail" in proc.stdout
    assert sorted(listing) == ["latest", step_name(1)]  # step 1 kept, no partial save left


# --- item 9: Ctrl-C ---------------------------------------------------------------------------------------------

def test_ctrl_c_saves_a_checkpoint_at_the_end_of_the_step_and_stops(config, tmp_path):
    run_dir = tmp_path / "runs" / "interrupted"
    proc = launch_train(argv(config, tmp_path / "runs", "interrupted", "--train.train_steps=400",
                             "--train.eval_batches=0"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_training(run_dir, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    (saved,) = step_dirs(run_dir / "checkpoints")
    assert problems(saved) == []
    assert f"step {int(saved.name[5:])}: stop signal (SIGINT); checkpoint saved, stopping" in (
        run_dir / "train.log").read_text()


def test_a_second_ctrl_c_stops_at_once_in_one_line(config, tmp_path):
    """Steps of 64 micro-batches (seconds each): the second Ctrl-C, sent as soon as the first is acknowledged,
    lands inside the step whose end the first one waits for."""
    run_dir, err = tmp_path / "runs" / "twice", tmp_path / "stderr"
    with open(err, "w") as sink:
        proc = launch_train(argv(config, tmp_path / "runs", "twice", "--train.train_steps=400",
                                 "--train.eval_batches=0", "--train.micro_batch_size=1",
                                 "--train.global_batch_size=64"), stdout=subprocess.DEVNULL, stderr=sink)
        wait_for_training(run_dir, proc)
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        while "SIGINT: saving a checkpoint" not in err.read_text() and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    assert proc.returncode == 130, err.read_text()[-3000:]
    assert "interrupted by a second Ctrl-C" in one_error_line(err.read_text())


# --- items 7 and 11: data and resume input --------------------------------------------------------------------------

@pytest.mark.parametrize("damage,expected", [("truncate", r"has \d+ bytes, the manifest says \d+ \(truncated"),
                                             ("delete", "listed in the manifest is missing")])
def test_a_truncated_or_missing_train_shard_is_refused_at_the_start(config, data, tmp_path, damage, expected):
    manifest, shard = damaged_data(data, tmp_path, "train", damage)
    with pytest.raises(ConfigError, match=f"data.train_manifest: shard {shard} {expected}"):
        prepare(argv(config, tmp_path / "runs", "x", f"--data.train_manifest={manifest}"), ONE)


def test_resuming_with_another_data_stream_is_refused_naming_the_setting(three_steps, config, tmp_path):
    common, _ = three_steps
    checkpoint = tmp_path / "runs" / "r" / "checkpoints" / step_name(3)
    fresh = argv(config, tmp_path / "runs", "other", "--train.eval_batches=0")
    with pytest.raises(CheckpointError, match=r"saved with train\.seq_len = 64, this run has 32; .*resume with "
                                              r"train\.seq_len = 64"):
        prepare(fresh + ["--train.seq_len=32", f"--resume={checkpoint}"], ONE)
    with pytest.raises(CheckpointError, match=r"saved with data\.seed = 0, this run has 7"):
        prepare(fresh + ["--data.seed=7", f"--resume={checkpoint}"], ONE)
    run = prepare(common + ["--train.seq_len=32", "--resume=auto"], ONE)  # auto: found after the start
    with pytest.raises(CheckpointError, match=r"saved with train\.seq_len = 64, this run has 32"):
        train(run, None)


@pytest.mark.parametrize("target,expected", [
    ("run", "is a run's checkpoint directory, not one checkpoint; give one of its step_NNNNNNNN directories"),
    ("checkpoints", "is a run's checkpoint directory, not one checkpoint"),
    ("data", "is not a checkpoint")])
def test_resume_pointed_at_a_run_or_a_data_directory_is_one_line(three_steps, config, data, tmp_path, target,
                                                                 expected):
    """three_steps: the run whose directory (and checkpoints/) --resume is pointed at."""
    path = {"run": tmp_path / "runs" / "r", "checkpoints": tmp_path / "runs" / "r" / "checkpoints",
            "data": data["manifest"].parent}[target]
    proc = launch_train(argv(config, tmp_path / "runs", "other", f"--resume={path}"))
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert str(path) in line and expected in line
