"""AdamW with weight decay on the weight matrices only.

No decay for:
  * parameters with fewer than 2 dimensions: biases, norm gains, per-head gate biases;
  * embedding tables (nn.Embedding weights, and the LM head when it is tied to the embedding);
  * meta-learned initial memory states: parameters of a module whose name ends in "_init" (the mixers'
    gen_init / mem_init), which are starting points of the inner loop, not weights to shrink.
Everything else (linear and readout matrices, conv filters) decays.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_hope.config import OptimConfig


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


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    decay, no_decay = split_decay(model)
    groups = [{"params": list(decay.values()), "weight_decay": cfg.weight_decay},
              {"params": list(no_decay.values()), "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
