"""Checkpoint save and load times on CPU, one process: a synchronous save, the blocking part of an async save
(copying the state into reused CPU buffers and writing the small per-run and per-rank files; the shards, the
manifest checksums and the rename happen in the background), the async save's time to completion, and a load
(find with checksum verification + resharding load), for the tiny and the ~125M presets with a stepped AdamW
state. Each mode saves 1 + --repeats times (the modes alternating); the table shows the medians of the saves after
the first (a run's steady state), the first async save's blocking time (which allocates the staging buffers)
and the median of --repeats loads. Then, on the newest checkpoint, what reading its metadata and checking its
files cost: DCP's pickle reader against the safe reader, and the checks of retention, of a load and of `verify`.

`python -m benchmarks.checkpoint` prints a table and `key: value` lines; `async_blocking_over_sync` is the
~125M preset's async blocking time over its synchronous save time (goal <= 0.10).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import median

import torch
from torch.distributed.checkpoint import FileSystemReader

from benchmarks.common import emit
from checkpoints.layout import step_dirs
from checkpoints.manager import CheckpointManager
from checkpoints.manifest import file_problems, problems
from checkpoints.safe_reader import SafeFileSystemReader
from checkpoints.state import TrainingState
from megatron_hope.config import load
from megatron_hope.model.lm import HopeLM
from megatron_hope.model.summary import count_parameters
from megatron_hope.training.loop import Trainer
from megatron_hope.training.metrics import RunLogger
from megatron_hope.training.optimizer import build_optimizer, init_state
from megatron_hope.training.schedule import lr_lambda

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"tiny": "hope_tiny.toml", "125m": "hope_125m.toml"}


@dataclass
class DataPosition:
    """The loader's resume state (a few bytes of JSON in run_state.json); this benchmark reads no corpus."""

    consumed_samples: int = 0

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = state["consumed_samples"]


def training_state(preset: str) -> TrainingState:
    """The preset's model and an AdamW state after one step on random gradients (real moments to write)."""
    cfg = load(str(REPO / "configs" / PRESETS[preset]), ["--train.device=cpu"])
    torch.manual_seed(0)
    model = HopeLM(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    init_state(optimizer)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.train.train_steps))
    trainer = Trainer(model, optimizer, scheduler, cfg, torch.device("cpu"), RunLogger(None, 1, enabled=False),
                      flops_per_token=0.0, peak_flops=None, steps_done=1)
    return TrainingState(cfg, model, optimizer, scheduler, trainer, DataPosition(), rank=0, world_size=1)


def timed_save(manager: CheckpointManager, state: TrainingState) -> tuple[float, float]:
    """(seconds save() blocked, seconds until the checkpoint is complete) of one save after the next step."""
    state.trainer.steps_done += 1
    start = time.perf_counter()
    blocked = manager.save(state)
    manager.wait()
    return blocked, time.perf_counter() - start


def integrity_costs(checkpoint: Path, repeats: int) -> dict[str, float]:
    """Medians of `repeats` rounds, the readers and checks alternating: DCP's own metadata reader (pickle) and the
    safe reader; the checks of retention (sizes), of a load without and with hashes."""
    costs = {"metadata_pickle_s": lambda: FileSystemReader(str(checkpoint)).read_metadata(),
             "metadata_safe_s": lambda: SafeFileSystemReader(str(checkpoint)).read_metadata(),
             "check_sizes_s": lambda: file_problems(checkpoint),
             "check_no_hash_s": lambda: problems(checkpoint, checksums=False),
             "check_hash_s": lambda: problems(checkpoint, checksums=True)}
    times: dict[str, list[float]] = {key: [] for key in costs}
    for _ in range(repeats):
        for key, run in costs.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    return {key: median(t) for key, t in times.items()}


def measure(preset: str, root: Path, repeats: int) -> dict[str, float]:
    """One run per mode saving 1 + repeats times, the modes alternating (so that both see the same background
    load); medians of the later saves, the first async save's blocking time, the median of `repeats` loads."""
    state = training_state(preset)
    managers = {mode: CheckpointManager(root / f"{preset}-{mode}", replace(state.cfg.checkpoint, keep_last=1,
                                                                         async_save=mode == "async"),
                                        log=lambda _: None)
                for mode in ("sync", "async")}
    saves: dict[str, list[tuple[float, float]]] = {mode: [] for mode in managers}
    for _ in range(1 + repeats):
        for mode, manager in managers.items():
            saves[mode].append(timed_save(manager, state))
    loads = []
    for _ in range(repeats):
        start = time.perf_counter()
        managers["async"].load(state, managers["async"].find("auto"))
        loads.append(time.perf_counter() - start)
    newest = step_dirs(managers["async"].root)[0]
    results = integrity_costs(newest, repeats) | {"params_m": count_parameters(state.cfg.model)["total"] / 1e6,
               "bytes": sum(p.stat().st_size for p in newest.iterdir()),
               "sync_later_total_s": median(total for _, total in saves["sync"][1:]),
               "async_first_blocking_s": saves["async"][0][0],
               "async_later_blocking_s": median(blocked for blocked, _ in saves["async"][1:]),
               "async_later_total_s": median(total for _, total in saves["async"][1:]),
               "load_s": median(loads)}
    for mode in managers:
        shutil.rmtree(root / f"{preset}-{mode}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--repeats", type=int, default=3, help="timed saves per mode after the first, and loads")
    args = parser.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            rows[preset] = measure(preset, Path(tmp), args.repeats)
    print(f"{'preset':<7} {'params':>8} {'MiB':>8} {'sync s':>8} {'async block s':>14} {'(first save)':>13} "
          f"{'async total s':>14} {'load s':>8} {'block/sync':>11} {'total/sync':>11} {'load/sync':>10}")
    for preset, r in rows.items():
        sync = r["sync_later_total_s"]
        print(f"{preset:<7} {r['params_m']:7.1f}M {r['bytes'] / 2**20:8.1f} {sync:8.3f} "
              f"{r['async_later_blocking_s']:14.3f} {r['async_first_blocking_s']:13.3f} "
              f"{r['async_later_total_s']:14.3f} {r['load_s']:8.3f} {r['async_later_blocking_s'] / sync:11.3f} "
              f"{r['async_later_total_s'] / sync:11.3f} {r['load_s'] / sync:10.3f}")
    for preset, r in rows.items():
        for key in ("bytes", "sync_later_total_s", "async_first_blocking_s", "async_later_blocking_s",
                    "async_later_total_s", "load_s", "metadata_pickle_s", "metadata_safe_s", "check_sizes_s",
                    "check_no_hash_s", "check_hash_s"):
            emit(f"{preset}_{key}", r[key])
    if "125m" in rows:  # a run's steady state: every save after the first
        emit("async_blocking_over_sync", rows["125m"]["async_later_blocking_s"] / rows["125m"]["sync_later_total_s"])


if __name__ == "__main__":
    main()
