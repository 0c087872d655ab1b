"""Render a SLURM batch script from slurm/ and submit it:
`python -m launch.submit --config configs/X.toml --nodes N [--procs-per-node G] [--template torchrun|mpi]
 [--time HH:MM:SS] [--partition P] [--dry-run] [--section.field=value ...]`.

The options (time limit in one of SLURM's formats, signal lead shorter than it, port, threads, job name) and the
config (with the overrides, for nodes x procs-per-node ranks) are checked before anything is submitted. The run
is named <job name>-<SLURM job id>, which a requeued job keeps, so it resumes its own checkpoints.
The job runs the Python interpreter that runs this (its environment must be on a filesystem the nodes share).
Prints the job id (sbatch --parsable), or the script with --dry-run.
"""
from __future__ import annotations

import argparse
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from string import Template

from launch.data import check_data
from megatron_hope.config import check_run_name, load
from megatron_hope.config_base import ConfigError

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = {"torchrun": REPO / "slurm" / "torchrun.sbatch", "mpi": REPO / "slurm" / "mpi.sbatch"}
TIME_FORMATS = ("minutes", "minutes:seconds", "hours:minutes:seconds", "days-hours", "days-hours:minutes",
                "days-hours:minutes:seconds")  # sbatch --time's, besides UNLIMITED (or INFINITE)
UNIT_S = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}
UNIT_BELOW = {"hours": 24, "minutes": 60, "seconds": 60}  # the bound of a field that follows a larger unit
JOB_NAME = re.compile(r"[A-Za-z0-9._-]+")  # goes unquoted into the batch script and names the run directory
LONGEST_JOB_ID = str(2**32 - 1)


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--procs-per-node", type=int, default=1, help="GPUs (or CPU ranks) per node")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default="torchrun")
    parser.add_argument("--job-name", default="hope")
    parser.add_argument("--time", default="01:00:00", help=f"SLURM time limit: {', '.join(TIME_FORMATS)} or UNLIMITED")
    parser.add_argument("--signal-lead-s", type=int, default=120,
                        help="seconds before the time limit at which USR1 asks for a checkpoint (SLURM may send "
                             "it up to 60 s earlier); shorter than the time limit")
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


def time_fields(text: str) -> dict[str, int]:
    """{unit: value} of a SLURM time limit in one of TIME_FORMATS. A field after a larger unit must stay below
    it: SLURM would read 25:61:00 as 26:01:00, which is more likely a typo than meant."""
    shape = re.sub("[0-9]+", "N", text)
    form = next((f for f in TIME_FORMATS if re.sub("[a-z]+", "N", f) == shape), None)
    if form is None:
        raise ConfigError(f"--time {text!r} is not a SLURM time limit: give {', '.join(TIME_FORMATS)} or "
                          "UNLIMITED, e.g. 24:00:00")
    fields = dict(zip(re.split("[-:]", form), map(int, re.findall("[0-9]+", text))))
    for unit, value in list(fields.items())[1:]:
        if value >= UNIT_BELOW[unit]:
            seconds = fields_s(fields)
            raise ConfigError(f"--time {text!r} ({form}) has {unit} {value}, not below {UNIT_BELOW[unit]}: write "
                              f"{seconds // 3600:02}:{seconds // 60 % 60:02}:{seconds % 60:02} if that is meant")
    return fields


def fields_s(fields: dict[str, int]) -> int:
    return sum(UNIT_S[unit] * value for unit, value in fields.items())


def time_limit_s(text: str) -> int | None:
    """The time limit in seconds as SLURM applies it (seconds round up to whole minutes); None for UNLIMITED or
    INFINITE. Zero, which SLURM also takes as no limit, is refused as a likely mistake."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    seconds = fields_s(time_fields(text))
    if seconds == 0:
        raise ConfigError(f"--time {text!r} is zero, which SLURM takes as no limit: give a positive limit, or "
                          "UNLIMITED for none")
    return 60 * math.ceil(seconds / 60)


def check_range(option: str, value: int, low: int, high: int | None = None) -> None:
    if value < low or (high is not None and value > high):
        allowed = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(f"{option} {value} is out of range: give {allowed}")


def check_job_name(name: str) -> None:
    """The job name names the run directory <job name>-<SLURM job id>: what the trainer accepts as a run name,
    and no character that sbatch or the batch script would split or expand."""
    if not JOB_NAME.fullmatch(name):
        raise ConfigError(f"--job-name {name!r} is not a plain name: use letters, digits, '-', '_' and '.' "
                          "(it names the run directory <job name>-<SLURM job id>)")
    check_run_name(f"{name}-{LONGEST_JOB_ID}", "--job-name (run directory <job name>-<SLURM job id>)")


def check_signal_lead(lead_s: int, time: str) -> None:
    """SLURM takes 0..65535 s; a lead not shorter than the time limit would send USR1 at the start."""
    check_range("--signal-lead-s", lead_s, 0, 65535)
    limit_s = time_limit_s(time)
    if limit_s is not None and lead_s >= limit_s:
        raise ConfigError(f"--signal-lead-s {lead_s} is not shorter than --time {time} ({limit_s} s): USR1 would "
                          "come at once; give a smaller lead or a longer time")


def check_options(args: argparse.Namespace) -> None:
    """The options as SLURM and the batch script take them."""
    check_range("--nodes", args.nodes, 1)
    check_range("--procs-per-node", args.procs_per_node, 1)
    check_signal_lead(args.signal_lead_s, args.time)
    check_range("--rdzv-port", args.rdzv_port, 1, 65535)
    check_range("--omp-threads", args.omp_threads, 1)
    check_job_name(args.job_name)


def check(args: argparse.Namespace, overrides: list[str]) -> None:
    """The checks launch.train makes before starting, for nodes x procs-per-node ranks."""
    cfg = load(args.config, overrides)
    cfg.validate_run(args.nodes * args.procs_per_node)
    check_data(cfg)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse(argv)
    try:
        check_options(args)
        check(args, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    script = render(args, overrides)
    if args.dry_run:
        print(script)
        return 0
    if shutil.which("sbatch") is None:
        print("error: sbatch not found: run on a SLURM login node, or use --dry-run", file=sys.stderr)
        return 1
    done = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True)
    if done.returncode != 0:
        errors = "; ".join(line.strip() for line in done.stderr.splitlines() if line.strip())
        print(f"error: sbatch failed: {errors}", file=sys.stderr)
        return 1
    print(done.stdout.strip().split(";")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
