"""Schedule-aware gradient accumulation of the CMS levels (training/loop.py): level l with outer period K_l
accumulates its gradients locally and steps (and, under FSDP2, synchronizes) only on steps divisible by K_l."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from megatron_hope.config import load
from megatron_hope.model.cms import cms_level_of
from megatron_hope.model.lm import HopeLM
from megatron_hope.training.grad_clip import clip_grad_norm
from megatron_hope.training.loop import Trainer, batch_loss
from megatron_hope.training.metrics import RunLogger
from megatron_hope.training.optimizer import build_optimizer
from megatron_hope.training.schedule import lr_lambda
from train_helpers import assert_same_run, run_in_process, run_torchrun, tiny_run_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STEPS = 8


def batches(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield {"tokens": torch.randint(0, vocab, (2, 33), generator=g), "doc_start": torch.zeros(2, 32, dtype=torch.bool)}


def tiny_cfg(periods: list[int]):
    cfg = load(str(CONFIGS / "hope_tiny.toml"), [
        "--train.micro_batch_size=1", "--train.global_batch_size=2", "--train.seq_len=32",
        f"--train.train_steps={STEPS}", "--train.eval_batches=0", "--optim.warmup_steps=2",
        "--optim.grad_clip=0.5", "--model.memory.eta_max=0.1"])
    for level, period in zip(cfg.model.cms.levels, periods, strict=True):
        level.period = period
    return cfg


def trainer_run(periods: list[int], period_groups: bool = True) -> tuple[list[tuple], list[dict]]:
    """STEPS steps of the Trainer (2 micro-batches of 1 per step) -> per-step (loss, norm, skipped), and the
    parameters after each step."""
    cfg = tiny_cfg(periods)
    torch.manual_seed(0)
    model = HopeLM(cfg.model)
    optimizer = build_optimizer(model, cfg.optim, periods if period_groups else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, STEPS))
    trainer = Trainer(model, optimizer, scheduler, cfg, torch.device("cpu"), RunLogger(None, STEPS, False),
                      flops_per_token=1.0, peak_flops=None)
    data, results, params = batches(cfg.model.vocab_size), [], []
    for _ in range(STEPS):
        results.append(trainer.step([next(data), next(data)]))
        scheduler.step()
        params.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return results, params


def reference_run(periods: list[int]) -> tuple[list[tuple], list[dict]]:
    """The documented semantics written out plainly: one AdamW per (level, decay) group, the level's gradient
    summed over its window and divided by K_l, clipped with the norm of the due groups, stepped when due."""
    cfg = tiny_cfg(periods)
    torch.manual_seed(0)
    model = HopeLM(cfg.model)
    groups = build_optimizer(model, cfg.optim, periods).param_groups
    opts = [torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}], lr=cfg.optim.lr,
                              betas=tuple(cfg.optim.betas), eps=cfg.optim.eps) for g in groups]
    schedule = lr_lambda(cfg.optim, STEPS)
    acc = {id(p): torch.zeros_like(p) for p in model.parameters()}
    data, results, params = batches(cfg.model.vocab_size), [], []
    for step in range(1, STEPS + 1):
        model.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(2):
            loss = batch_loss(model, next(data), torch.device("cpu"))
            (loss / 2).backward()
            total += loss.item()
        for p in model.parameters():
            acc[id(p)] += p.grad
        due = [i for i, g in enumerate(groups) if step % g["period"] == 0]
        grads = {id(p): acc[id(p)] / groups[i]["period"] for i in due for p in groups[i]["params"]}
        norm = math.sqrt(sum(g.double().square().sum().item() for g in grads.values()))
        scale = min(1.0, cfg.optim.grad_clip / (norm + 1e-6))
        for i in due:
            for p in groups[i]["params"]:
                p.grad = grads[id(p)] * scale
                acc[id(p)].zero_()
            for g in opts[i].param_groups:
                g["lr"] = cfg.optim.lr * schedule(step - 1)
            opts[i].step()
        results.append((total / 2, norm, False))
        params.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return results, params


def test_slow_levels_change_only_on_their_boundaries():
    """A level's parameters are bit-identical between its due steps and change on each of them."""
    periods = [1, 2, 4]
    _, params = trainer_run(periods)
    torch.manual_seed(0)
    init = {k: v.detach() for k, v in HopeLM(tiny_cfg(periods).model).named_parameters()}
    levels = set()
    for step in range(1, STEPS + 1):
        before = init if step == 1 else params[step - 2]
        for name, value in params[step - 1].items():
            level = cms_level_of(name)
            changed = not torch.equal(value, before[name])
            assert changed == (step % (periods[level] if level is not None else 1) == 0), (step, name)
            levels.add(level)
    assert {None, 0, 1, 2} <= levels


def test_trainer_matches_the_documented_semantics():
    got, got_params = trainer_run([1, 2, 4])
    ref, ref_params = reference_run([1, 2, 4])
    for (gl, gn, gs), (rl, rn, rs) in zip(got, ref):
        assert not gs
        assert gl == pytest.approx(rl, rel=1e-6)
        assert gn == pytest.approx(rn, rel=1e-5)
    for step in range(STEPS):
        for name, value in ref_params[step].items():
            torch.testing.assert_close(got_params[step][name], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"step {step + 1} {name}: {m}")


def test_periods_all_one_is_the_plain_trainer():
    """Periods all 1 with the per-level machinery equal the plain loop bit for bit: backward, clip over every
    parameter, one AdamW step over the (decay, no decay) groups."""
    got, got_params = trainer_run([1, 1, 1])
    cfg = tiny_cfg([1, 1, 1])
    torch.manual_seed(0)
    model = HopeLM(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    assert len(optimizer.param_groups) == 2
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, STEPS))
    data = batches(cfg.model.vocab_size)
    for step in range(STEPS):
        total = torch.zeros(())
        for _ in range(2):
            loss = batch_loss(model, next(data), torch.device("cpu"))
            (loss / 2).backward()
            total += loss.detach()
        norm = clip_grad_norm(list(model.parameters()), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        assert got[step] == ((total / 2).item(), norm.item(), False)
        for name, value in model.named_parameters():
            assert torch.equal(got_params[step][name], value), (step, name)


def test_the_plain_trainer_differs_from_the_schedule():
    """The comparison above can fail: periods (1, 2, 4) do not train like periods all 1."""
    _, slow = trainer_run([1, 2, 4])
    _, plain = trainer_run([1, 1, 1])
    assert not all(torch.equal(slow[-1][k], plain[-1][k]) for k in plain[-1])


@pytest.fixture(scope="module")
def periods_reference(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("cms_periods")
    config = tiny_run_config(root / "tiny.toml", data, root / "runs", periods=(1, 4, 16))
    return config, run_in_process(["--config", str(config), "--train.run_name=ref"], root / "ref.pt")


def unit_shard_bytes(config: Path, periods: tuple[int, ...], dp: int) -> tuple[int, dict[int, int]]:
    """Analytic reduce-scatter bytes per rank of FSDP2 (each parameter's dim 0 padded to a multiple of dp, fp32):
    (every step: the root and the block units, {level: its units together, on its due steps})."""
    model = HopeLM(load(str(config)).model)

    def shard(p: torch.Tensor) -> int:
        return math.ceil(p.shape[0] / dp) * (p.numel() // p.shape[0]) * 4 if p.ndim else 4

    every, per_level = 0, {}
    for name, p in model.named_parameters():
        level = cms_level_of(name)
        if level is not None and periods[level] > 1:
            per_level[level] = per_level.get(level, 0) + shard(p)
        else:
            every += shard(p)
    return every, per_level


def test_dp2_with_periods_matches_one_process_and_counts_the_bytes(periods_reference, tmp_path):
    config, ref = periods_reference
    got = run_torchrun(["--config", str(config), "--train.run_name=dp2", "--train.log_comm_bytes=true"],
                       tmp_path / "dp2.pt")
    assert_same_run(ref, got, steps=5, param_atol=1e-6)
    records = [json.loads(line) for line in (Path(got["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    reduced = [r["reduced_bytes_dp"] for r in records if r["group"] == "comm"]
    every, per_level = unit_shard_bytes(config, (1, 4, 16), 2)
    expected = [every + sum(b for l, b in per_level.items() if step % (1, 4, 16)[l] == 0) for step in range(1, 6)]
    # beyond the gradients: fp32 scalar all-reduces (the step's mean loss, the gradient norm), the same every step
    extra = {got_bytes - want for got_bytes, want in zip(reduced, expected)}
    assert len(extra) == 1 and 0 < extra.pop() <= 8, (reduced, expected)
    assert reduced[3] - reduced[0] == per_level[1] > 0  # level 1 is reduced on step 4 only
    # per parameter group, counted in each FSDP2 unit's reduce-scatter: the gradient bytes above, split by group
    comm = [r for r in records if r["group"] == "comm"]
    assert [r["reduced_bytes_group_period1"] for r in comm] == [every] * 5
    assert [r.get("reduced_bytes_group_cms_level1", 0) for r in comm] == [0, 0, 0, per_level[1], 0]
    assert [r.get("reduced_bytes_group_cms_level2", 0) for r in comm] == [0] * 5  # K = 16 is not due in 5 steps


def test_slow_levels_are_bit_identical_between_boundaries_under_dp2(periods_reference):
    """Level 2 (period 16) never steps in 5 steps: its parameters are the initial ones bit for bit."""
    config, ref = periods_reference
    torch.manual_seed(load(str(config)).train.seed)
    init = dict(HopeLM(load(str(config)).model).named_parameters())
    names = [n for n in ref["params"] if cms_level_of(n) == 2]
    assert names
    for name in names:
        assert torch.equal(ref["params"][name], init[name].detach()), name


@pytest.mark.parametrize("override, named", [
    ("--parallel.dp_engine=deepspeed", "deepspeed"),
    ("--parallel.tensor_model_parallel_size=2", "tensor_model_parallel_size"),
    ("--parallel.pipeline_model_parallel_size=2", "pipeline_model_parallel_size")])
def test_periods_with_deepspeed_or_model_parallelism_are_rejected(override, named, data, tmp_path):
    from megatron_hope.config_base import ConfigError

    config = tiny_run_config(tmp_path / "tiny.toml", data, tmp_path / "runs", periods=(1, 4, 16))
    cfg = load(str(config), ["--train.micro_batch_size=1", override])
    with pytest.raises(ConfigError, match=rf"periods \[1, 4, 16\].*{named}"):
        cfg.validate_run(4)
    for level in cfg.model.cms.levels:
        level.period = 1
    cfg.validate_run(4)  # all periods 1: accepted
