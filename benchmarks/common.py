"""Timing helpers shared by the benchmarks: median of repeated runs after warm-up, implementations taking turns,
`key: value` output."""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], reps: int, warmup: int = 1, device: torch.device | None = None) -> float:
    dev = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_median_seconds(steps: dict[str, Callable[[], object]], reps: int, device: torch.device,
                               warmup: int = 2) -> dict[str, float]:
    """Median time of each step; the steps take turns in every round, so load from other processes hits all
    alike. The first `warmup` rounds are not timed."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(warmup + reps):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            if rep >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def emit(key: str, value: object) -> None:
    if isinstance(value, float):
        value = f"{value:.4g}"
    print(f"{key}: {value}", flush=True)


def add_run_options(parser: argparse.ArgumentParser, compile_help: str) -> None:
    """--threads, --compile and --device, shared by the benchmarks that time models or layers."""
    parser.add_argument("--compile", action="store_true", help=compile_help)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")


def start_run(args: argparse.Namespace) -> torch.device:
    """Applies --threads and prints the device, thread count and whether the timing is compiled."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    emit("device", device.type if device.type == "cpu" else torch.cuda.get_device_name(device))
    emit("threads", torch.get_num_threads())
    emit("compiled", str(args.compile).lower())
    return device
