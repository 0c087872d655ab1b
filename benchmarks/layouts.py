"""Step time of each parallel layout relative to one process, and bytes communicated per step per mesh dim
(counted on the actual collectives, megatron_hope/training/comm_counter.py), on the tiny HOPE of the quickstart corpus.

    python -m benchmarks.layouts [--steps 6]

Each layout trains `--steps` optimizer steps under torchrun (gloo, 1 thread per rank) with the same global
batch; the first step is warm-up, the table reports the median of the others. On a 2-core machine the
4-process layouts are oversubscribed: their times say little about scaling, their bytes are exact.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit
from megatron_hope.config import load

LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "1proc": (1, []),
    "dp2": (2, []),
    "tp2": (2, ["--parallel.tensor_model_parallel_size=2"]),
    "tp2_sp": (2, ["--parallel.tensor_model_parallel_size=2", "--parallel.sequence_parallel=true"]),
    "pp2_1f1b": (2, ["--parallel.pipeline_model_parallel_size=2"]),
    "pp2_interleaved": (2, ["--parallel.pipeline_model_parallel_size=2",
                            "--parallel.virtual_pipeline_model_parallel_size=2"]),
    "deepspeed_zero1": (2, ["--parallel.dp_engine=deepspeed", "--parallel.zero_stage=1"]),
    "deepspeed_zero2": (2, ["--parallel.dp_engine=deepspeed", "--parallel.zero_stage=2"]),
    "dp2_tp2": (4, ["--parallel.tensor_model_parallel_size=2"]),
    "pp2_tp2": (4, ["--parallel.tensor_model_parallel_size=2", "--parallel.pipeline_model_parallel_size=2"]),
}
COMMON = ["--model.n_layers=4", "--train.micro_batch_size=2", "--train.global_batch_size=8", "--train.seq_len=64",
          "--train.eval_batches=0", "--train.log_interval=1000", "--optim.warmup_steps=1"]


def worker(argv: list[str], out: str) -> None:
    """Under torchrun: launch.train's run with the step timed and its collectives counted."""
    from launch import train as launch_train
    from launch.env import ProcessEnv
    from megatron_hope.training import loop
    from megatron_hope.training.comm_counter import CommCounter

    run = launch_train.prepare(argv, ProcessEnv.from_environ())
    mesh = launch_train.start_process_group(run)
    records: list[dict] = []

    def counted(step):
        def counted_step(self, micro_batches):
            # DeepSpeed runs without our mesh: all of its collectives are data-parallel
            counter = CommCounter(mesh, other="dp" if mesh is None else "other")
            t0 = time.perf_counter()
            with counter:
                result = step(self, micro_batches)
            records.append({"seconds": time.perf_counter() - t0, "bytes": dict(counter.bytes)})
            return result
        return counted_step

    loop.Trainer.step = counted(loop.Trainer.step)
    if run.cfg.parallel.dp_engine == "deepspeed":
        from megatron_hope.training.deepspeed_trainer import DeepSpeedTrainer
        DeepSpeedTrainer.step = counted(DeepSpeedTrainer.step)
    launch_train.train(run, mesh)
    if run.env.rank == 0:
        Path(out).write_text(json.dumps(records))


def all_periods_one(config: str) -> str:
    """An override setting every CMS level's outer period to 1: model parallelism runs without schedule-aware
    accumulation, and every layout then trains the same thing."""
    levels = load(config).model.cms.levels
    return "--model.cms.levels=[" + ",".join(f"{{hidden={l.hidden},period=1,inner_chunk={l.inner_chunk}}}"
                                             for l in levels) + "]"


def run_layout(name: str, config: str, runs: Path, steps: int) -> list[dict]:
    nproc, extra = LAYOUTS[name]
    out = runs / f"{name}.json"
    argv = ["--config", config, *COMMON, all_periods_one(config), *extra, f"--train.train_steps={steps}", f"--train.runs_dir={runs}",
            f"--train.run_name={name}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "benchmarks.layouts", "--worker", str(out), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"layout {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[3:], sys.argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--config", default="configs/quickstart.toml", help="its [data] must exist (quickstart builds it)")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        print(f"{'layout':<18}{'procs':>6}{'step s':>10}{'vs 1proc':>10}  bytes/step per mesh dim")
        for name in a.layouts.split(","):
            records = run_layout(name, a.config, Path(tmp), a.steps)[1:]  # the first step warms up
            seconds = statistics.median(r["seconds"] for r in records)
            base = base or seconds
            dims = sorted({d for r in records for d in r["bytes"]})
            per_dim = {d: statistics.median(r["bytes"].get(d, 0) for r in records) for d in dims}
            desc = ", ".join(f"{d} {int(v):,}" for d, v in per_dim.items()) or "none"
            print(f"{name:<18}{LAYOUTS[name][0]:>6}{seconds:>10.3f}{seconds / base:>10.2f}  {desc}", flush=True)
            emit(f"{name}_step_time_ratio", seconds / base)
            for d, v in per_dim.items():
                emit(f"{name}_bytes_per_step_{d}", int(v))


if __name__ == "__main__":
    main()
