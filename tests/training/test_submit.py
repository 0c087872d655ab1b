"""launch.submit without a cluster: the rendered batch scripts (bash syntax, the SBATCH options the launch relies
on, the submitting interpreter, the quoted overrides), a config that does not fit nodes x procs-per-node refused
before sbatch runs, and a submission through a stand-in sbatch that records the script it is given.
test_slurm_cluster.py runs the same scripts on a real cluster."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launch import submit
from train_helpers import tiny_run_config


@pytest.fixture
def config(data, tmp_path) -> Path:
    return tiny_run_config(tmp_path / "tiny.toml", data, tmp_path / "runs")


def fake_sbatch(tmp_path: Path, monkeypatch) -> Path:
    """An `sbatch` first on PATH that saves its stdin and arguments and answers like `sbatch --parsable`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "sbatch"
    script.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch.args\ncat > {tmp_path}/sbatch.script\n'
                      'echo "4242;hopeci"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    return tmp_path / "sbatch.script"


@pytest.mark.parametrize("template", ["torchrun", "mpi"])
def test_dry_run_renders_a_valid_batch_script(config, capsys, template):
    argv = ["--config", str(config), "--nodes", "2", "--template", template, "--time", "00:30:00",
            "--signal-lead-s", "90", "--partition", "gpu", "--train.log_interval=2", "--dry-run"]
    assert submit.main(argv) == 0
    script = capsys.readouterr().out
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # syntax only
    for line in ("#SBATCH --nodes=2", "#SBATCH --time=00:30:00", "#SBATCH --signal=USR1@90", "#SBATCH --requeue",
                 "#SBATCH --partition=gpu"):
        assert line in script.splitlines(), line
    assert "--kill-on-bad-exit=1" in script and "--resume auto" in script
    assert f"{shlex.quote(sys.executable)} -m" in script
    assert f"--config {config.resolve()}" in script and "--train.log_interval=2" in script
    assert "--train.run_name=hope-$SLURM_JOB_ID" in script
    assert ("--rdzv_backend=c10d" in script) == (template == "torchrun")
    assert ("srun --mpi=pmix" in script) == (template == "mpi")


def test_a_layout_that_does_not_fit_is_refused_before_sbatch(config, tmp_path, monkeypatch, capsys):
    """global batch 4 = micro 2 x dp x accumulation has no solution for 3 ranks."""
    recorded = fake_sbatch(tmp_path, monkeypatch)
    assert submit.main(["--config", str(config), "--nodes", "3"]) == 2
    assert "train.global_batch_size = 4" in capsys.readouterr().err
    assert not recorded.exists()


def test_submits_the_rendered_script_and_prints_the_job_id(config, tmp_path, monkeypatch, capsys):
    recorded = fake_sbatch(tmp_path, monkeypatch)
    argv = ["--config", str(config), "--nodes", "2", "--template", "mpi"]
    assert submit.main(argv + ["--dry-run"]) == 0
    rendered = capsys.readouterr().out
    assert submit.main(argv) == 0
    assert capsys.readouterr().out.strip() == "4242"
    assert (tmp_path / "sbatch.args").read_text().split() == ["--parsable"]
    assert recorded.read_text() + "\n" == rendered  # print() adds the last newline
