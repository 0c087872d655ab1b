"""Render a SLURM batch script from slurm/ and submit it:
`python -m launch.submit --config configs/X.toml --nodes N [--procs-per-node G] [--template torchrun|mpi]
 [--time HH:MM:SS] [--partition P] [--dry-run] [--section.field=value ...]`.

The config (with the overrides) is checked for nodes x procs-per-node ranks before anything is submitted. The
run is named <job name>-<SLURM job id>, which a requeued job keeps, so it resumes its own checkpoints.
The job runs the Python interpreter that runs this (its environment must be on a filesystem the nodes share).
Prints the job id (sbatch --parsable), or the script with --dry-run.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from string import Template

from launch.data import check_data
from megatron_hope.config import load
from megatron_hope.config_base import ConfigError

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = {"torchrun": REPO / "slurm" / "torchrun.sbatch", "mpi": REPO / "slurm" / "mpi.sbatch"}


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--procs-per-node", type=int, default=1, help="GPUs (or CPU ranks) per node")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default="torchrun")
    parser.add_argument("--job-name", default="hope")
    parser.add_argument("--time", default="01:00:00", help="SLURM time limit")
    parser.add_argument("--signal-lead-s", type=int, default=120,
                        help="seconds before the time limit at which USR1 asks for a checkpoint")
    parser.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    parser.add_argument("--sbatch-arg", action="append", default=[], help="another #SBATCH option, repeatable")
    parser.add_argument("--output", default="%x-%j.out", help="SLURM output file pattern")
    parser.add_argument("--rdzv-port", type=int, default=29500)
    parser.add_argument("--omp-threads", type=int, default=1)
    parser.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    return parser.parse_known_args(argv)


def render(args: argparse.Namespace, overrides: list[str]) -> str:
    extra = [f"--partition={args.partition}"] if args.partition else []
    extra += args.sbatch_arg
    return Template(TEMPLATES[args.template].read_text()).substitute(
        job_name=args.job_name, nodes=args.nodes, procs_per_node=args.procs_per_node, time=args.time,
        signal_lead_s=args.signal_lead_s, output=args.output, rdzv_port=args.rdzv_port,
        omp_threads=args.omp_threads, workdir=shlex.quote(str(REPO)), python=shlex.quote(sys.executable),
        config=shlex.quote(str(Path(args.config).resolve())), run_name=f"{args.job_name}-$SLURM_JOB_ID",
        train_args=" ".join(shlex.quote(o) for o in overrides),
        sbatch_extra="\n".join(f"#SBATCH {shlex.quote(e)}" for e in extra))


def check(args: argparse.Namespace, overrides: list[str]) -> None:
    """The checks launch.train makes before starting, for nodes x procs-per-node ranks."""
    if args.nodes < 1 or args.procs_per_node < 1:
        raise ConfigError("--nodes and --procs-per-node must be >= 1")
    cfg = load(args.config, overrides)
    cfg.validate_run(args.nodes * args.procs_per_node)
    check_data(cfg)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse(argv)
    try:
        check(args, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    script = render(args, overrides)
    if args.dry_run:
        print(script)
        return 0
    done = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"error: sbatch failed: {done.stderr.strip()}", file=sys.stderr)
        return 1
    print(done.stdout.strip().split(";")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
