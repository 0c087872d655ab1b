"""AdamW with weight decay on the weight matrices only.

No decay for:
  * parameters with fewer than 2 dimensions: biases, norm gains, per-head gate biases;
  * embedding tables (nn.Embedding weights, and the LM head when it is tied to the embedding);
  * meta-learned initial memory states: parameters of a module whose name ends in "_init" (the mixers'
    gen_init / mem_init), which are starting points of the inner loop, not weights to shrink.
Everything else (linear and readout matrices, conv filters) decays.

CMS levels with an outer period K_l > 1 (model.cms.levels[l].period) get param groups of their own (decayed and
not decayed), tagged "cms_level" = l and "period" = K_l; every other parameter is in the period-1 groups. The
trainer steps a group only on steps where step % period == 0 (step_groups); see training/loop.py for the
semantics. A level's learning rate is optim.lr x K_l ** optim.cms_lr_period_exponent (0: the same peak lr).
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_hope.config import OptimConfig
from megatron_hope.model.cms import cms_level_of


def split_decay(model: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """(decayed, not decayed) parameters by qualified name; tied parameters appear once."""
    exempt: set[int] = set()
    for name, module in model.named_modules():
        is_init = name.rsplit(".", 1)[-1].endswith("_init")
        for p in module.parameters(recurse=False):
            if is_init or isinstance(module, nn.Embedding) or p.ndim < 2:
                exempt.add(id(p))
    decay, no_decay = {}, {}
    for name, p in model.named_parameters():
        (no_decay if id(p) in exempt else decay)[name] = p
    return decay, no_decay


def build_optimizer(model: nn.Module, cfg: OptimConfig, periods: list[int] | None = None) -> torch.optim.AdamW:
    """AdamW over (decay, no decay) groups; with `periods` (K_l of each CMS level), the parameters of levels with
    K_l > 1 in groups of their own per level."""
    decay, no_decay = split_decay(model)
    periods = periods or []
    groups = []
    for level in [None] + [l for l, k in enumerate(periods) if k > 1]:
        period = 1 if level is None else periods[level]
        lr = cfg.lr * period ** cfg.cms_lr_period_exponent
        for params, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)):
            members = [p for name, p in params.items() if _group_level(name, periods) == level]
            if members or level is None:
                groups.append({"params": members, "weight_decay": wd, "lr": lr, "cms_level": level,
                               "period": period})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def _group_level(name: str, periods: list[int]) -> int | None:
    level = cms_level_of(name)
    return level if level is not None and level < len(periods) and periods[level] > 1 else None


def due_groups(optimizer: torch.optim.Optimizer, step: int) -> list[dict]:
    """The param groups that step at (1-based) optimizer step `step`: those whose period divides it."""
    return [g for g in optimizer.param_groups if step % g.get("period", 1) == 0]


def step_groups(optimizer: torch.optim.Optimizer, groups: list[dict]) -> None:
    """optimizer.step() over `groups` only: the others' parameters, moments and step counts stay as they are."""
    saved = optimizer.param_groups
    optimizer.param_groups = groups
    try:
        optimizer.step()
    finally:
        optimizer.param_groups = saved


def init_state(optimizer: torch.optim.AdamW) -> None:
    """Create AdamW's per-parameter state now, exactly as its lazy first step would (step 0 on the CPU, zero
    moments shaped and sharded like the parameter), so that a checkpoint holds the same entries whichever CMS
    levels have stepped yet and loads into a freshly built optimizer entry for entry."""
    for group in optimizer.param_groups:
        if group["fused"] or group["capturable"] or group["amsgrad"]:
            raise ValueError("init_state mirrors the default AdamW (not fused, capturable or amsgrad)")
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {"step": torch.tensor(0.0, dtype=torch.get_default_dtype()),
                                      "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                      "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
