"""launch.submit without a cluster: the rendered batch scripts (bash syntax, the SBATCH options the launch relies
on, the submitting interpreter, the quoted overrides), a config that does not fit nodes x procs-per-node and bad
options (time limit, signal lead, port, threads, job name) refused before sbatch runs, a missing or failing sbatch,
a submission through a stand-in sbatch that records the script it is given, and the rendered scripts run with
stand-in srun and trainer: a task whose ranks stopped cleanly exits 75 whatever its launcher reports.
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


@pytest.mark.parametrize("bad", [
    ["--time", "1h"], ["--time", ""], ["--time", "-5"], ["--time", "10 "], ["--time", "2-"], ["--time", "1:2:3:4"],
    ["--time", "25:61:00"], ["--time", "1-24"], ["--time", "10:60"], ["--time", "0"], ["--time", "00:00:00"],
    ["--signal-lead-s", "-1"], ["--signal-lead-s", "65536"], ["--time", "00:30:00", "--signal-lead-s", "1800"],
    ["--time", "0:30", "--signal-lead-s", "60"],  # SLURM rounds 30 s up to a minute: USR1 at the start
    ["--rdzv-port", "0"], ["--rdzv-port", "65536"], ["--omp-threads", "0"], ["--nodes", "0"],
    ["--procs-per-node", "0"], ["--job-name", "a/b"], ["--job-name", "my job"], ["--job-name", ""],
    ["--job-name", "$(id)"], ["--job-name", 'x"y'], ["--job-name", "a\tb"],
    ["--job-name", "x" * 190],  # the run directory <job name>-<job id> could pass 200 bytes
])
def test_bad_options_are_refused_in_one_line_before_sbatch(config, tmp_path, monkeypatch, capsys, bad):
    """One line naming the option (the last one given) and exit 2; sbatch never runs."""
    recorded = fake_sbatch(tmp_path, monkeypatch)
    assert submit.main(["--config", str(config), "--nodes", "1", *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad[-2]} ") and err.count("\n") == 1, err
    assert not recorded.exists()


@pytest.mark.parametrize("time", ["90", "90:30", "36:00:00", "2-12", "2-12:30", "2-12:30:15", "UNLIMITED", "infinite"])
def test_slurm_time_formats_are_accepted(config, capsys, time):
    assert submit.main(["--config", str(config), "--nodes", "1", "--time", time, "--dry-run"]) == 0
    assert f"#SBATCH --time={time}" in capsys.readouterr().out.splitlines()


def test_the_longest_job_name_that_fits_is_accepted(config, capsys):
    name = "hope_x.1-" + "x" * 180  # 189 bytes, and '-' plus a 10-digit job id: 200
    assert submit.main(["--config", str(config), "--nodes", "1", "--job-name", name, "--dry-run"]) == 0
    assert f"--train.run_name={name}-$SLURM_JOB_ID" in capsys.readouterr().out


def test_a_missing_sbatch_is_one_line(config, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert submit.main(["--config", str(config), "--nodes", "1"]) == 1
    assert capsys.readouterr().err == "error: sbatch not found: run on a SLURM login node, or use --dry-run\n"


def test_a_failing_sbatch_prints_its_errors_in_one_line(config, tmp_path, monkeypatch, capsys):
    fake_sbatch(tmp_path, monkeypatch)
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: x' >&2\n"
                                             "echo 'sbatch: error: Batch job submission failed' >&2\nexit 1\n")
    assert submit.main(["--config", str(config), "--nodes", "1"]) == 1
    assert capsys.readouterr().err == ("error: sbatch failed: sbatch: error: invalid partition specified: x; "
                                       "sbatch: error: Batch job submission failed\n")


def stand_in(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


# The trainer (or torchrun around it) as each task starts it: STUB_TERM_PARENT sends TERM to the task's shell
# first, as SLURM does to a step's processes on a requeue or when --kill-on-bad-exit ends it; STUB_STOPS writes
# the stop file as a rank that stopped cleanly does; then it exits 1, as torchrun does for workers that exit 75.
TRAINER_STUB = """echo "$MEGATRON_HOPE_STOP_FILE" >> "$STUB_LOG"
if [ -n "$STUB_TERM_PARENT" ]; then kill -TERM $PPID; sleep 0.2; fi
if [ -n "$STUB_STOPS" ]; then echo 75 > "$MEGATRON_HOPE_STOP_FILE"; fi
exit 1
"""


def run_rendered(template: str, tmp_path: Path, monkeypatch, **stub_env: str) -> int:
    """The batch script of a one-node job run by bash, with stand-ins for srun (runs its command as task 0),
    scontrol and the Python interpreter (TRAINER_STUB)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in(bin_dir / "srun", 'while [[ $1 == -* ]]; do shift; done\nSLURM_PROCID=0 exec "$@"\n')
    stand_in(bin_dir / "scontrol", "echo n1\n")
    monkeypatch.setattr(sys, "executable", str(stand_in(bin_dir / "python", TRAINER_STUB)))
    args, overrides = submit.parse(["--config", "tiny.toml", "--nodes", "1", "--template", template])
    script = tmp_path / "job.sbatch"
    script.write_text(submit.render(args, overrides))
    (tmp_path / "tmp").mkdir()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TMPDIR": str(tmp_path / "tmp"), "STUB_LOG": str(tmp_path / "log"),
           "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1", **stub_env}
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60).returncode


@pytest.mark.parametrize("template", ["torchrun", "mpi"])
@pytest.mark.parametrize("stub_env, status", [({"STUB_STOPS": "1"}, 75), ({}, 1),
                                              ({"STUB_STOPS": "1", "STUB_TERM_PARENT": "1"}, 75),
                                              ({"STUB_TERM_PARENT": "1"}, 1)])
def test_a_task_whose_ranks_stopped_cleanly_exits_75(tmp_path, monkeypatch, template, stub_env, status):
    """torchrun reports its workers' exit 75 as a failure (exit 1), and a rank that srun terminates after another
    task exited reports the signal: the stop file, not the launcher's status, says the ranks stopped cleanly.
    The batch script exits with the step's status (75: stopped, resubmit or requeue to continue)."""
    assert run_rendered(template, tmp_path, monkeypatch, **stub_env) == status
    stop_file = Path((tmp_path / "log").read_text().strip())
    assert stop_file.parent == tmp_path / "tmp" and stop_file.name.endswith(".7.0.0")  # job, restart, task
    assert not stop_file.exists()  # removed: a requeued run starts without it
