"""Continuum Memory System (spec 1.1 step 4, 1.4): a chain of SwiGLU levels, each x <- x + MLP_l(RMSNorm(x)).

Each level's parameters live under `...cms.levels.{l}.` so that a trainer can find a level by parameter name
(`cms_level_of`) and give it its own outer period; names survive wrapping, attributes on Parameters would not.

In-sequence fast-weight updates (spec 1.4 proposal) need the next-token loss, so the LM drives them
(HopeLM.forward_inner_updates) with a `CMSFastWeights`; a level then reads with per-sequence fast weights: a dict
from the level MLP's parameter names ("w_gate.weight", ...) to tensors with a leading batch dimension.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_map

from megatron_hope.config import CMSConfig, ModelConfig
from megatron_hope.model.layers import RMSNorm, SwiGLU

FastWeights = dict[str, torch.Tensor]


class CMSLevel(nn.Module):
    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor, weights: FastWeights | None = None) -> torch.Tensor:
        h = self.norm(x)
        if weights is None:
            return x + self.mlp(h)
        # one MLP per sequence: map over the batch dimension of both the weights and the input
        return x + vmap(lambda w, hb: functional_call(self.mlp, w, (hb,)))(weights, h)


class ContinuumMemory(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.levels = nn.ModuleList(CMSLevel(cfg.d_model, lvl.hidden, cfg.norm_eps) for lvl in cfg.cms.levels)

    def forward(self, x: torch.Tensor, weights: dict[int, FastWeights] | None = None) -> torch.Tensor:
        """weights: fast weights by level index for the levels that adapt in-sequence; other levels use their own."""
        for l, level in enumerate(self.levels):
            x = level(x, None if weights is None else weights.get(l))
        return x


def cms_level_of(param_name: str) -> int | None:
    """CMS level index of a parameter from its qualified name, or None if it belongs to no CMS level.

    Wrapper segments that start with '_' (_fsdp_wrapped_module, _checkpoint_wrapped_module, _orig_mod) are skipped,
    so the answer is the same before and after FSDP, activation checkpointing or torch.compile wrapping.
    """
    parts = [p for p in param_name.split(".") if not p.startswith("_")]
    for i in range(len(parts) - 2):
        if parts[i] == "cms" and parts[i + 1] == "levels" and parts[i + 2].isdigit():
            return int(parts[i + 2])
    return None


def parameter_levels(model: nn.Module) -> dict[str, int]:
    """{parameter name: CMS level} for every parameter of `model` that belongs to a CMS level."""
    levels = {name: cms_level_of(name) for name, _ in model.named_parameters()}
    return {name: lvl for name, lvl in levels.items() if lvl is not None}


class CMSFastWeights:
    """Per-sequence fast weights of the CMS levels that adapt in-sequence (inner_chunk > 0), in every block, and
    their pending gradient sums (first-order, spec 1.4 proposal).

    Per chunk: `begin_chunk` hands out fresh views of the current weights, one dict per block; `end_chunk` adds
    the gradient of the chunk's loss w.r.t. those views (so only this chunk's reads count; whatever was carried
    in from earlier chunks is a constant), and in each sequence whose tokens since its document start are a
    multiple of a level's inner_chunk, that level steps theta <- theta - inner_lr * sum (the schedule restarts
    at every document start, so a packed document adapts as it would alone). The step is detached, so the
    outer gradient reaches the meta-learned weights through the reads only.
    """

    def __init__(self, blocks: nn.ModuleList, cfg: CMSConfig, batch: int):
        self.lr = cfg.inner_lr
        self.n_blocks = len(blocks)
        self.period = {l: lvl.inner_chunk for l, lvl in enumerate(cfg.levels) if lvl.inner_chunk > 0}
        self.batch = batch
        self.init = {(i, l): dict(block.cms.levels[l].mlp.named_parameters())
                     for i, block in enumerate(blocks) for l in self.period}
        self.weights = {key: self._fresh(key) for key in self.init}
        self.grad_sum = {key: tree_map(torch.zeros_like, ws) for key, ws in self.weights.items()}
        self.reads: dict[tuple[int, int], FastWeights] = {}
        device = next(blocks.parameters()).device
        self.since_start = torch.zeros(batch, dtype=torch.long, device=device)  # tokens since each document start

    def _fresh(self, key: tuple[int, int]) -> FastWeights:
        return {n: p.expand(self.batch, *p.shape) for n, p in self.init[key].items()}

    def restart(self, mask: torch.Tensor) -> None:
        """Sequences where `mask` (B,) holds start a document: meta-learned weights again, no pending gradient."""
        m = mask.view(-1, 1, 1)
        self.since_start = torch.where(mask, 0, self.since_start)
        for key in self.weights:
            self.weights[key] = {n: torch.where(m, w0, self.weights[key][n]) for n, w0 in self._fresh(key).items()}
            self.grad_sum[key] = {n: torch.where(m, 0.0, g) for n, g in self.grad_sum[key].items()}

    def detach(self) -> None:
        """Cut the history (no outer backward): the weights become leaves that the inner gradient still reaches."""
        self.weights = tree_map(lambda w: w.detach().requires_grad_(), self.weights)

    def begin_chunk(self) -> list[dict[int, FastWeights]]:
        self.reads = tree_map(lambda w: w.view_as(w), self.weights)
        return [{l: self.reads[(i, l)] for l in self.period} for i in range(self.n_blocks)]

    def end_chunk(self, chunk_loss: torch.Tensor, chunk_len: int, retain_graph: bool) -> None:
        flat = [(key, n) for key, ws in self.reads.items() for n in ws]
        grads = torch.autograd.grad(chunk_loss, [self.reads[key][n] for key, n in flat], retain_graph=retain_graph)
        for (key, n), g in zip(flat, grads):
            self.grad_sum[key][n] = self.grad_sum[key][n] + g
        self.since_start = self.since_start + chunk_len
        for key, ws in self.weights.items():  # per sequence, without a host sync
            step = (self.since_start % self.period[key[1]] == 0).view(-1, 1, 1)
            self.weights[key] = {n: torch.where(step, w - self.lr * self.grad_sum[key][n], w) for n, w in ws.items()}
            self.grad_sum[key] = {n: torch.where(step, 0.0, g) for n, g in self.grad_sum[key].items()}
