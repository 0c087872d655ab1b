"""Timing helpers shared by the benchmarks: median of repeated runs after warm-up, `key: value` output."""
from __future__ import annotations

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


def emit(key: str, value: object) -> None:
    if isinstance(value, float):
        value = f"{value:.4g}"
    print(f"{key}: {value}", flush=True)
