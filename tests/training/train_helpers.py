"""Helpers for the trainer tests: a synthetic corpus, a tiny-run config, and training runs in this process or
under torchrun that return their per-step results and final full parameters (see dump_run.py)."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import dump_run
from megatron_hope.config import DataConfig, OptimConfig, TrainConfig, load
from megatron_hope.config_base import to_toml

REPO = Path(__file__).resolve().parents[2]


def make_documents(n: int, seed: int) -> list[str]:
    """Deterministic pseudo-English documents of varying length."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(1, 8))) for _ in range(200)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 200))).capitalize() + "." for _ in range(n)]


def tiny_run_config(path: Path, data: dict[str, Path], runs_dir: Path, periods: tuple[int, ...] = (1, 1, 1)) -> Path:
    """hope_tiny's model, 5 fp32 steps of global batch 4 x 64 tokens on the synthetic data, gradients clipped
    (grad_clip below the gradient norm), a final evaluation.

    memory.eta_max is lowered from 0.5 to 0.1: at 0.5 the tiny model's gradient is so sensitive that 1-ulp
    differences in the parameters (from another summation order) grow about 100x per step, and no two
    non-identical computations of the same run agree to 1e-5 after a few steps.

    periods: the CMS levels' outer periods (hope_tiny has 1, 4, 16); all 1 by default, the plain trainer."""
    cfg = load(str(REPO / "configs" / "hope_tiny.toml"), ["--model.memory.eta_max=0.1"])
    cfg.train = TrainConfig(micro_batch_size=2, global_batch_size=4, seq_len=64, train_steps=5, eval_batches=1,
                            log_interval=1, runs_dir=str(runs_dir), device="cpu")
    for level, period in zip(cfg.model.cms.levels, periods, strict=True):
        level.period = period
    cfg.optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2, grad_clip=1.0)
    manifest = str(data["manifest"])
    cfg.data = DataConfig(train_manifest=manifest, val_manifest=manifest, tokenizer_dir=str(data["tokenizer"]),
                          shuffle_buffer=16)
    path.write_text(to_toml(cfg))
    return path


def run_in_process(argv: list[str], out: Path) -> dict:
    dump_run.main(argv + ["--out", str(out)])
    return torch.load(out)


def run_torchrun(argv: list[str], out: Path, nproc: int = 2, timeout: float = 180,
                 script: str = dump_run.__file__) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           script, *argv, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out)


def assert_same_run(ref: dict, got: dict, steps: int, param_atol: float, rtol: float = 1e-5) -> None:
    """Per-step losses, gradient norms and learning rates, the validation loss (relative) and the final
    parameters (relative and absolute) of two runs agree; no step was skipped."""
    assert [s["skipped"] for s in ref["steps"]] == [s["skipped"] for s in got["steps"]] == [False] * steps
    for key in ("loss", "grad_norm", "lr"):
        torch.testing.assert_close(torch.tensor([s[key] for s in got["steps"]], dtype=torch.float64),
                                   torch.tensor([s[key] for s in ref["steps"]], dtype=torch.float64),
                                   rtol=rtol, atol=0, msg=lambda m: f"per-step {key}: {m}")
    torch.testing.assert_close(got["val_loss"], ref["val_loss"], rtol=rtol, atol=0)
    assert got["params"].keys() == ref["params"].keys()
    for name, value in ref["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=rtol, atol=param_atol,
                                   msg=lambda m: f"{name}: {m}")


class NaNLoss(nn.Module):
    """Wraps a model; the loss of the forward calls numbered in `nan_calls` (0-based) is NaN. With
    keep_gradient the NaN stays out of the gradient (which is the true loss's), else the gradient is NaN too."""

    def __init__(self, model: nn.Module, nan_calls: set[int], keep_gradient: bool = False):
        super().__init__()
        self.model, self.nan_calls, self.calls, self.keep_gradient = model, nan_calls, 0, keep_gradient

    def forward(self, *args):
        loss = self.model(*args)
        self.calls += 1
        if self.calls - 1 not in self.nan_calls:
            return loss
        return loss + float("nan") * loss.detach() if self.keep_gradient else loss * float("nan")
