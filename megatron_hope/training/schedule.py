"""Learning-rate schedules: linear warmup, then cosine, linear or WSD (warmup-stable-decay) decay.

With peak lr P, floor m, W warmup steps and N train steps, the lr used by optimizer step s (0-based) is
  s < W:           P * (s + 1) / W
  cosine:          m + (P - m) * (1 + cos(pi * p)) / 2,  p = (s - W) / (N - W)
  linear:          P - (P - m) * p
  wsd:             P until the last D = round(decay_fraction * N) steps, then P - (P - m) * (s - (N - D)) / D
so the decay would reach m at s = N, one step after the last.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from megatron_hope.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, train_steps: int) -> float:
    peak, floor, warmup = cfg.lr, cfg.min_lr, cfg.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.schedule == "wsd":
        decay = cfg.decay_steps(train_steps)
        start = train_steps - decay
        return peak if step < start else peak - (peak - floor) * (step - start) / decay
    progress = (step - warmup) / max(1, train_steps - warmup)
    if cfg.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return peak - (peak - floor) * progress


def lr_lambda(cfg: OptimConfig, train_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr for torch.optim.lr_scheduler.LambdaLR (param groups start at cfg.lr)."""
    return lambda step: lr_at(step, cfg, train_steps) / cfg.lr
