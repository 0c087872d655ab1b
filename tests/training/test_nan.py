"""Non-finite losses: the step is skipped on the spot (parameters and optimizer state unchanged), training goes
on after fewer than train.max_nan_steps of them in a row, and stops with TrainingError at that many."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from megatron_hope.config import load
from megatron_hope.model.lm import HopeLM
from megatron_hope.training.loop import Trainer, TrainingError
from megatron_hope.training.metrics import RunLogger
from megatron_hope.training.optimizer import build_optimizer
from megatron_hope.training.schedule import lr_lambda
from train_helpers import NaNLoss

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def batches(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield {"tokens": torch.randint(0, vocab, (2, 33), generator=g), "doc_start": torch.zeros(2, 32, dtype=torch.bool)}


def make_trainer(nan_calls: set[int], max_nan_steps: int = 3, train_steps: int = 8) -> Trainer:
    cfg = load(str(CONFIGS / "hope_tiny.toml"), [
        "--train.micro_batch_size=2", "--train.global_batch_size=2", "--train.seq_len=32",
        f"--train.train_steps={train_steps}", f"--train.max_nan_steps={max_nan_steps}", "--train.eval_batches=0",
        "--optim.warmup_steps=0"])
    torch.manual_seed(0)
    model = NaNLoss(HopeLM(cfg.model), nan_calls)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.train.train_steps))
    return Trainer(model, optimizer, scheduler, cfg, torch.device("cpu"), RunLogger(None, train_steps, False),
                   flops_per_token=1.0, peak_flops=None)


def test_nan_step_leaves_parameters_and_optimizer_state_unchanged():
    trainer = make_trainer(nan_calls={1})
    data = batches(trainer.cfg.model.vocab_size)
    assert trainer.step([next(data)])[2] is False
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    state = copy.deepcopy(trainer.optimizer.state_dict())
    loss, norm, skipped = trainer.step([next(data)])
    assert skipped and loss != loss
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, params[name]), name
        assert p.grad is None, name
    after = trainer.optimizer.state_dict()["state"]
    for key, entry in state["state"].items():
        for field, value in entry.items():
            assert torch.equal(after[key][field], value), (key, field)
    assert trainer.step([next(data)])[2] is False  # the next finite step updates again
    assert any(not torch.equal(p, params[n]) for n, p in trainer.model.named_parameters())


def test_fewer_than_the_limit_in_a_row_is_survived():
    trainer = make_trainer(nan_calls={2, 3, 5, 6}, max_nan_steps=3)
    result = trainer.fit(batches(trainer.cfg.model.vocab_size), None)
    assert [s.skipped for s in result.steps] == [False, False, True, True, False, True, True, False]


def test_the_limit_in_a_row_stops_training():
    trainer = make_trainer(nan_calls={2, 3, 4}, max_nan_steps=3)
    with pytest.raises(TrainingError, match=r"3 consecutive steps \(up to step 5\).*train\.max_nan_steps = 3"):
        trainer.fit(batches(trainer.cfg.model.vocab_size), None)
