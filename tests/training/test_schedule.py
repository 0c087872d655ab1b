"""LR schedules at known steps against hand-computed closed forms, and through LambdaLR on a real optimizer."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_hope.config import OptimConfig
from megatron_hope.training.schedule import lr_at, lr_lambda

N = 110  # train steps; warmup 10, so the decay spans steps 10..109 with progress (s - 10) / 100


@pytest.mark.parametrize("schedule, step, expected", [
    ("cosine", 0, 0.1), ("cosine", 4, 0.5), ("cosine", 9, 1.0),  # warmup: (s + 1) / 10
    ("cosine", 10, 1.0), ("cosine", 35, 0.1 + 0.45 * (1 + math.cos(math.pi / 4))), ("cosine", 60, 0.55),
    ("cosine", 109, 0.1 + 0.45 * (1 + math.cos(math.pi * 0.99))),
    ("linear", 9, 1.0), ("linear", 10, 1.0), ("linear", 35, 0.775), ("linear", 60, 0.55), ("linear", 109, 0.109),
    # wsd: decay over the last round(0.2 * 110) = 22 steps, from step 88
    ("wsd", 9, 1.0), ("wsd", 50, 1.0), ("wsd", 87, 1.0), ("wsd", 88, 1.0), ("wsd", 99, 0.55), ("wsd", 109, 0.1409090909),
])
def test_closed_form(schedule, step, expected):
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule=schedule, decay_fraction=0.2)
    assert lr_at(step, cfg, N) == pytest.approx(expected, rel=1e-9)


def test_no_warmup_starts_at_peak():
    cfg = OptimConfig(lr=2e-3, min_lr=0.0, warmup_steps=0, schedule="linear")
    assert lr_at(0, cfg, 100) == pytest.approx(2e-3)
    assert lr_at(50, cfg, 100) == pytest.approx(1e-3)


def test_lambda_lr_sets_the_optimizer_lr():
    cfg = OptimConfig(lr=3e-4, min_lr=3e-5, warmup_steps=3, schedule="cosine")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, 20))
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, cfg, 20) for s in range(20)], rel=1e-12)
