"""What a checkpoint holds of a run, gathered from and restored into the live objects.

Tensors (DCP, sharded, resharded on load): the model's parameters and AdamW's state under the full model's
parameter names, as torch.distributed.checkpoint.state_dict presents them for any layout (FSDP2, DTensor tensor
parallelism, pipeline stages holding a subset of the names). AdamW's param_groups are not saved: they are built
from the config, and their learning rates follow from the restored LR schedule.
Per rank (rank_RRRRR.pt, tensors only; rank_RRRRR.json): the RNG states and the pending CMS gradient accumulators.
Per run (run_state.json): counters, schedule, loader position, layout, code version.
"""
from __future__ import annotations

import functools
import json
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from data_pipeline.dataset import PackedTokenDataset
from megatron_hope.config import Config
from megatron_hope.model.summary import count_parameters
from megatron_hope.parallel import deepspeed_engine
from megatron_hope.training.loop import Trainer

RUN_STATE = "run_state.json"
CONFIG = "config.toml"


def estimated_checkpoint_bytes(cfg: Config) -> int:
    """About what one checkpoint takes on disk: fp32 parameters and AdamW's two fp32 moments, 12 bytes per
    parameter (the run state, RNG files and metadata add little; pending CMS gradients add up to 4 bytes per
    CMS parameter per rank)."""
    return 12 * count_parameters(cfg.model)["total"]


def rank_files(rank: int) -> tuple[str, str]:
    return f"rank_{rank:05d}.json", f"rank_{rank:05d}.pt"


@dataclass(frozen=True)
class Layout:
    """How the saving run was laid out; a load into another layout reshards."""

    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    engine: str

    @classmethod
    def of(cls, cfg: Config, world_size: int) -> Layout:
        p = cfg.parallel
        return cls(world_size, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                   world_size // p.model_parallel_size, p.dp_engine)

    def describe(self) -> str:
        return (f"{self.world_size} rank(s): tp {self.tensor_parallel} x pp {self.pipeline_parallel} x "
                f"dp {self.data_parallel} ({self.engine})")


@dataclass
class TrainingState:
    """The live objects of a run whose state a checkpoint saves and restores. With the DeepSpeed engine, `model`
    is the engine and the tensors go through parallel/deepspeed_engine.py in the same names, so that checkpoints
    convert between FSDP2 and DeepSpeed on load."""

    cfg: Config
    model: nn.Module  # the trained module (FSDP2-sharded, tensor-parallel, or this rank's pipeline stages)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    trainer: Trainer
    dataset: PackedTokenDataset  # this rank's training data (its position is global, the same on every rank)
    rank: int
    world_size: int

    @property
    def layout(self) -> Layout:
        return Layout.of(self.cfg, self.world_size)

    # --- saving ---------------------------------------------------------------------------------------------

    def tensors(self) -> dict[str, Any]:
        """The DCP state dict: {"model": {name: tensor}, "optim": {"state": {name: {"step", "exp_avg", ...}}}}."""
        if self.cfg.parallel.dp_engine == "deepspeed":
            return deepspeed_engine.checkpoint_tensors(self.model)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": {"state": optim_sd["state"]}}

    def run_state(self) -> dict[str, Any]:
        t = self.cfg.train
        return {"step": self.trainer.steps_done, "consumed_tokens": self.trainer.steps_done * t.global_batch_size * t.seq_len,
                "nan_run": self.trainer.nan_run, "scheduler": _json_safe(self.scheduler.state_dict()),
                "loader": self.dataset.state_dict(), "layout": vars(self.layout), "code_version": code_version()}

    def write_rank_files(self, directory: Path) -> None:
        rng = {"python": _json_safe(random.getstate()), "numpy": _json_safe(np.random.get_state())}
        tensors = {"rng.torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        tensors |= {f"pending.{name}": g.detach().cpu().clone() for name, g in self.trainer.pending_gradients().items()}
        json_name, pt_name = rank_files(self.rank)
        (directory / json_name).write_text(json.dumps(rng))
        torch.save(tensors, directory / pt_name)

    # --- loading --------------------------------------------------------------------------------------------

    def load(self, directory: Path, run_state: dict[str, Any], read_tensors) -> list[str]:
        """Restore everything from the checkpoint in `directory` (run_state: its run_state.json;
        read_tensors(state_dict): fills a DCP state dict in place). Returns notes for the log."""
        notes = []
        if self.cfg.parallel.dp_engine == "deepspeed":
            deepspeed_engine.load_checkpoint_tensors(self.model, read_tensors)
        else:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            target = {"model": model_sd, "optim": {"state": optim_sd["state"]}}
            read_tensors(target)
            set_state_dict(self.model, self.optimizer, model_state_dict=target["model"],
                           optim_state_dict={"state": target["optim"]["state"],
                                             "param_groups": optim_sd["param_groups"]})
        self.scheduler.load_state_dict(run_state["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
        self.trainer.steps_done, self.trainer.nan_run = run_state["step"], run_state["nan_run"]
        self.dataset.load_state_dict(run_state["loader"])
        saved = Layout(**run_state["layout"])
        same_layout = saved == self.layout
        if not same_layout:
            notes.append(f"resharded from {saved.describe()} to {self.layout.describe()}")
        notes += self._load_rank_files(directory, saved, same_layout)
        return notes

    def _load_rank_files(self, directory: Path, saved: Layout, same_layout: bool) -> list[str]:
        json_name, pt_name = rank_files(self.rank)
        notes = []
        if same_layout:
            rng = json.loads((directory / json_name).read_text())
            random.setstate(_python_rng(rng["python"]))
            np.random.set_state(tuple(np.array(v, dtype=np.uint32) if i == 1 else v
                                      for i, v in enumerate(rng["numpy"])))
            mine = torch.load(directory / pt_name, weights_only=True)
            torch.set_rng_state(mine["rng.torch"])
            if "rng.cuda" in mine and torch.cuda.is_available():
                torch.cuda.set_rng_state(mine["rng.cuda"])
            pending = {k.removeprefix("pending."): v for k, v in mine.items() if k.startswith("pending.")}
        else:
            notes.append("RNG states start fresh (the layout changed)")
            pending = _mean_pending(directory, saved.world_size)
            if pending:
                notes.append(f"pending CMS gradients: the mean of the {saved.world_size} saved ranks' accumulators")
        self.trainer.restore_pending_gradients(pending)
        return notes


def _mean_pending(directory: Path, world_size: int) -> dict[str, torch.Tensor]:
    """The mean over the saved ranks of their local pending accumulators: what their next reduction would
    average, so that any new data-parallel size reduces the same gradient (up to rounding)."""
    total: dict[str, torch.Tensor] = {}
    for rank in range(world_size):
        state = torch.load(directory / rank_files(rank)[1], weights_only=True)
        for k, v in state.items():
            if k.startswith("pending."):
                name = k.removeprefix("pending.")
                total[name] = total[name] + v if name in total else v.clone()
    return {k: v / world_size for k, v in total.items()}


def _json_safe(value: Any) -> Any:
    """Tuples, numpy arrays and numbers as JSON lists/numbers."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def _python_rng(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss


@functools.cache
def code_version() -> dict[str, str]:
    """The package version and, in a git checkout, the commit (with "+dirty" for uncommitted changes)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("megatron-hope")
    except PackageNotFoundError:
        package = "unknown"
    repo = Path(__file__).resolve().parents[1]
    commit = "unknown"
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            commit = head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"package": package, "commit": commit}

