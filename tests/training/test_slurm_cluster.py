"""Training on a real two-node SLURM cluster that this module starts (slurm/ci_cluster.sh: Debian's slurm-wlm
and munge, two slurmd in their own network and UTS namespaces): jobs rendered and submitted by launch.submit.

(1) a 2-node torchrun job reproduces the single-process run; (2) a job signalled with USR1 checkpoints, requeues
itself, resumes and ends with the parameters of the uninterrupted job, bit for bit, its first run's tasks exiting
75 (a clean stop, not torchrun's failure), and a stopped job that cannot be requeued ends with exit code 75;
(3) one rank killed mid-run ends the whole job in under 30 s; (4) an mpi4py-bootstrapped job (srun --mpi=pmix)
reproduces the single-process run, and so does a plain `srun python -m launch.train` job; training started in
the batch script itself (not a task) is refused at once; (5) the cluster comes up again over a node's veth that
outlived `down`. Skips, saying why, without root, network namespaces or the SLURM packages (.ci/run installs
them)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from checkpoints.export import read_model
from checkpoints.layout import read_latest
from train_helpers import REPO, assert_same_run, run_in_process, tiny_run_config

STEPS = 40
CLUSTER = REPO / "slurm" / "ci_cluster.sh"


def why_no_cluster() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, munge, slurmd)"
    for tool in ("slurmctld", "slurmd", "munged", "sbatch", "ip", "nsenter", "unshare"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (bash slurm/ci_cluster.sh install, as .ci/run does)"
    probe = subprocess.run(["ip", "netns", "add", "hope-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"network namespaces are not available here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "hope-probe"], capture_output=True)
    return None


@pytest.fixture(scope="module")
def cluster():
    reason = why_no_cluster()
    if reason:
        pytest.skip(reason)
    up = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr[-3000:]
    yield
    subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def setup(data, tmp_path_factory):
    """The tiny run's config (STEPS steps, no final evaluation) and its single-process reference."""
    root = tmp_path_factory.mktemp("slurm")
    config = tiny_run_config(root / "tiny.toml", data, root / "runs")
    argv = ["--config", str(config), f"--train.train_steps={STEPS}", "--train.eval_batches=0"]
    return root, config, run_in_process(argv + ["--train.run_name=ref"], root / "ref.pt")


def submit(root: Path, config: Path, name: str, template: str = "torchrun", steps: int = STEPS,
           sbatch_args: tuple[str, ...] = ()) -> str:
    cmd = [sys.executable, "-m", "launch.submit", "--config", str(config), "--nodes", "2", "--template", template,
           "--job-name", name, "--time", "00:10:00", "--output", str(root / "%x-%j.out"),
           *(f"--sbatch-arg={a}" for a in sbatch_args),
           f"--train.runs_dir={root / 'runs'}", f"--train.train_steps={steps}", "--train.eval_batches=0"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def job_state(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def wait_job(job: str, timeout: float = 240) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(0.5)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not end within {timeout} s: {job_state(job)}")


def job_result(root: Path, name: str, job: str) -> dict:
    """The job's per-step records and its final parameters (from its newest checkpoint), as dump_run gives."""
    run_dir = root / "runs" / f"{name}-{job}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: {"step": r["step"], "loss": r["loss"], "grad_norm": r["grad_norm"], "lr": r["lr"],
                         "skipped": False} for r in records if r["group"] == "train"}
    params = read_model(read_latest(run_dir / "checkpoints"))
    return {"steps": [steps[s] for s in sorted(steps)], "params": params, "val_loss": None}


def output(root: Path, name: str, job: str) -> str:
    path = root / f"{name}-{job}.out"
    return path.read_text(errors="replace") if path.exists() else "(no output file)"


def assert_matches_reference(ref: dict, got: dict) -> None:
    assert_same_run({**ref, "val_loss": None}, got, steps=STEPS, param_atol=5e-6)


@pytest.fixture(scope="module")
def straight_job(cluster, setup):
    root, config, _ = setup
    job = submit(root, config, "straight")
    state = wait_job(job)
    assert state["JobState"] == "COMPLETED", output(root, "straight", job)
    assert "2 process(es) (torchrun launch)" in (root / "runs" / f"straight-{job}" / "train.log").read_text()
    return job_result(root, "straight", job)


def test_two_node_torchrun_job_matches_one_process(setup, straight_job):
    assert_matches_reference(setup[2], straight_job)


def test_mpi4py_bootstrapped_job_matches_one_process(cluster, setup):
    root, config, ref = setup
    job = submit(root, config, "mpi", template="mpi")
    state = wait_job(job)
    assert state["JobState"] == "COMPLETED", output(root, "mpi", job)
    assert "2 process(es) (mpi launch)" in (root / "runs" / f"mpi-{job}" / "train.log").read_text()
    assert_matches_reference(ref, job_result(root, "mpi", job))


def sbatch_wrap(root: Path, name: str, command: str) -> str:
    """A 2-node job (one task per node) whose batch script is `command`, run from the repository."""
    cmd = ["sbatch", "--parsable", f"--job-name={name}", "--nodes=2", "--ntasks-per-node=1", "--time=10",
           f"--output={root / '%x-%j.out'}", f"--chdir={REPO}", "--wrap", command]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip().split(";")[0]


def train_command(root: Path, config: Path, name: str) -> str:
    return (f"{sys.executable} -m launch.train --config {config} --train.run_name={name}-$SLURM_JOB_ID "
            f"--train.runs_dir={root / 'runs'} --train.train_steps={STEPS} --train.eval_batches=0")


def test_plain_srun_job_matches_one_process(cluster, setup):
    """`srun python -m launch.train`, no torchrun, no MPI: rank, size and rendezvous from SLURM's variables."""
    root, config, ref = setup
    job = sbatch_wrap(root, "srun", "srun --kill-on-bad-exit=1 " + train_command(root, config, "srun"))
    state = wait_job(job)
    assert state["JobState"] == "COMPLETED", output(root, "srun", job)
    assert "2 process(es) (slurm launch)" in (root / "runs" / f"srun-{job}" / "train.log").read_text()
    assert_matches_reference(ref, job_result(root, "srun", job))


def test_training_in_the_batch_script_itself_is_refused(cluster, setup):
    """The batch script of a 2-task job has SLURM_PROCID=0 and SLURM_NTASKS=2 but is no task of it: launching
    there must fail at once, not wait dist_timeout_s for a rank 1 that never starts."""
    root, config, _ = setup
    job = sbatch_wrap(root, "batch", train_command(root, config, "batch"))
    state = wait_job(job, timeout=60)
    assert (state["JobState"], state["ExitCode"]) == ("FAILED", "2:0"), output(root, "batch", job)
    assert "batch script or salloc shell of SLURM job" in output(root, "batch", job)


def train_steps_logged(run_dir: Path) -> int:
    try:
        return sum('"group": "train"' in line for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def wait_for_steps(run_dir: Path, job: str, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while train_steps_logged(run_dir) < count:
        assert time.monotonic() < deadline, f"no {count} steps in {timeout} s: {job_state(job)}"
        time.sleep(0.1)


def test_signalled_job_checkpoints_requeues_and_resumes_exactly(setup, straight_job):
    root, config, _ = setup
    job = submit(root, config, "signalled")
    run_dir = root / "runs" / f"signalled-{job}"
    wait_for_steps(run_dir, job, 3)
    # what --signal=USR1@T does before the time limit, now: USR1 to the job's step processes
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    state = wait_job(job, timeout=300)
    log = output(root, "signalled", job)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log
    first_run = log[:log.index(f"job {job} restart 1")]
    assert task_exits(first_run) == {0: "Exited with exit code 75", 1: "Exited with exit code 75"}, first_run
    assert "stop signal" in (run_dir / "train.log").read_text()
    resumed = job_result(root, "signalled", job)
    assert resumed["params"].keys() == straight_job["params"].keys()
    for name, value in straight_job["params"].items():
        assert torch.equal(resumed["params"][name], value), name


@pytest.mark.parametrize("template", ["torchrun", "mpi"])
def test_a_stopped_job_that_cannot_be_requeued_ends_with_exit_code_75(setup, cluster, template):
    """Submitted with --no-requeue, the trainer's `scontrol requeue` fails: the tasks and the batch script exit 75,
    and the job ends FAILED with exit code 75 (not torchrun's 1, nor 143 of a rank srun terminated)."""
    root, config, _ = setup
    name = f"norequeue-{template}"
    job = submit(root, config, name, template=template, steps=100000, sbatch_args=("--no-requeue",))
    wait_for_steps(root / "runs" / f"{name}-{job}", job, 2)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    state = wait_job(job, timeout=120)
    log = output(root, name, job)
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("FAILED", "75:0", "0"), log
    assert f"scontrol requeue {job} failed" in log
    assert task_exits(log) == {0: "Exited with exit code 75", 1: "Exited with exit code 75"}, log


def task_exits(log: str) -> dict[int, str]:
    """How srun reported each task's end in a job's output ("Exited with exit code N", "Terminated", ...)."""
    return {int(task): how for task, how in re.findall(r"srun: error: \S+: task (\d+): (.+)", log)}


def test_one_rank_killed_ends_the_job_within_30_seconds(setup, cluster):
    root, config, _ = setup
    job = submit(root, config, "killed", steps=100000)
    wait_for_steps(root / "runs" / f"killed-{job}", job, 2)
    victim = next(pid for pid in worker_pids() if job_and_rank(pid) == (job, 1))
    os.kill(victim, signal.SIGKILL)
    start = time.monotonic()
    state = wait_job(job, timeout=60)
    took = time.monotonic() - start
    print(f"job ended {took:.1f} s after rank 1 was killed ({state['JobState']})")
    assert state["JobState"] in ("FAILED", "CANCELLED") and took < 30, (took, state)


def worker_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "-x", r".*python.* -m launch\.train .*"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def job_and_rank(pid: int) -> tuple[str, int] | None:
    """A torchrun worker's (SLURM_JOB_ID, RANK) from its environment; None for any other process (another test's
    launch.train workers on this machine have no job id, or another one)."""
    try:
        entries = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    environ = dict(e.split("=", 1) for e in entries if "=" in e)
    if "SLURM_JOB_ID" not in environ or "RANK" not in environ:
        return None
    return environ["SLURM_JOB_ID"], int(environ["RANK"])


def test_bring_up_clears_a_node_link_left_by_an_earlier_cluster(cluster):
    """The kernel can keep a deleted node namespace, and the veth into it, for minutes after `down` (seen after
    this module's jobs); the next `up` must not fail on the veth's name."""
    subprocess.run(["bash", str(CLUSTER), "down"], capture_output=True, text=True, timeout=120, check=True)
    try:
        subprocess.run(["ip", "link", "add", "vh-n1", "type", "veth", "peer", "name", "vh-n1-peer"], check=True)
        up = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, up.stderr[-3000:]
    finally:
        subprocess.run(["ip", "link", "del", "vh-n1-peer"], capture_output=True)  # only left where `up` failed
