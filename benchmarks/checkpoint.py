"""Checkpoint save and load times on CPU, one process: a synchronous save, the blocking part of an async save
(copying the state into reused CPU buffers and writing the small per-run and per-rank files; the shards, the
manifest checksums and the rename happen in the background), the async save's time to completion, and a load
(find with checksum verification + resharding load), for the tiny and the ~125M presets with a stepped AdamW
state. Each mode saves twice; the table shows the second save (a run's steady state) and the first async save's
blocking time (which allocates the staging buffers).

`python -m benchmarks.checkpoint` prints a table and `key: value` lines; `async_blocking_over_sync` is the
~125M preset's async blocking time over its synchronous save time (goal <= 0.10).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import emit
from checkpoints.manager import CheckpointManager
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


def measure(preset: str, root: Path) -> dict[str, float]:
    state = training_state(preset)
    results = {"params_m": count_parameters(state.cfg.model)["total"] / 1e6}
    for mode in ("sync", "async"):
        run = root / f"{preset}-{mode}"
        cfg = state.cfg.checkpoint
        cfg.async_save, cfg.keep_last = mode == "async", 1
        manager = CheckpointManager(run, cfg, log=lambda _: None)
        for save in ("first", "later"):  # an async run's first save also allocates its staging buffers
            start = time.perf_counter()
            blocked = manager.save(state)
            manager.wait()
            results[f"{mode}_{save}_blocking_s"], results[f"{mode}_{save}_total_s"] = (
                blocked, time.perf_counter() - start)
            state.trainer.steps_done += 1
    directory = root / f"{preset}-async" / "checkpoints" / f"step_{state.trainer.steps_done - 1:08d}"
    results["mib"] = sum(p.stat().st_size for p in directory.iterdir()) / 2**20
    manager = CheckpointManager(root / f"{preset}-async", state.cfg.checkpoint, log=lambda _: None)
    start = time.perf_counter()
    manager.load(state, manager.find("auto"))
    results["load_s"] = time.perf_counter() - start
    shutil.rmtree(root / f"{preset}-sync")
    shutil.rmtree(root / f"{preset}-async")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    args = parser.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            rows[preset] = measure(preset, Path(tmp))
    print(f"{'preset':<7} {'params':>8} {'MiB':>8} {'sync s':>8} {'async block s':>14} {'(first save)':>13} "
          f"{'async total s':>14} {'load s':>8} {'block/sync':>11}")
    for preset, r in rows.items():
        print(f"{preset:<7} {r['params_m']:7.1f}M {r['mib']:8.1f} {r['sync_later_total_s']:8.3f} "
              f"{r['async_later_blocking_s']:14.3f} {r['async_first_blocking_s']:13.3f} {r['async_later_total_s']:14.3f} "
              f"{r['load_s']:8.3f} {r['async_later_blocking_s'] / r['sync_later_total_s']:11.3f}")
    for preset, r in rows.items():
        for key in ("sync_later_total_s", "async_first_blocking_s", "async_later_blocking_s", "async_later_total_s",
                    "load_s"):
            emit(f"{preset}_{key}", r[key])
    if "125m" in rows:  # a run's steady state: every save after the first
        emit("async_blocking_over_sync", rows["125m"]["async_later_blocking_s"] / rows["125m"]["sync_later_total_s"])

if __name__ == "__main__":
    main()
