"""The language model: embedding -> blocks (HOPE, Titans or Transformer++) -> final RMSNorm -> LM head."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from megatron_hope.config import ModelConfig
from megatron_hope.model.blocks import BLOCKS
from megatron_hope.model.cms import FastWeights
from megatron_hope.model.layers import RMSNorm, SwiGLU
from megatron_hope.model.attention import CausalSelfAttention

IGNORE_INDEX = -100  # targets with this value carry no loss (e.g. padding)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in fp32 (or wider); `targets` are already shifted (targets[t] follows token t)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


class HopeLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(BLOCKS[cfg.arch](cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for the embedding and every linear layer outside the mixers (which initialise
        themselves); projections that write into the residual stream get init_std / sqrt(number of residual
        branches), as GPT-2/Megatron scale by 1/sqrt(2 n_layers) for two branches per layer."""
        cfg = self.cfg
        branches_per_layer = 1 + (len(cfg.cms.levels) if cfg.arch == "hope" else 1)
        out_std = cfg.init_std / math.sqrt(branches_per_layer * cfg.n_layers)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.head.weight, std=cfg.init_std)
        for module in self.blocks.modules():
            if isinstance(module, SwiGLU):
                for w in (module.w_gate.weight, module.w_up.weight):
                    nn.init.normal_(w, std=cfg.init_std)
                nn.init.normal_(module.w_down.weight, std=out_std)
            elif isinstance(module, CausalSelfAttention):
                for w in (module.wq.weight, module.wk.weight, module.wv.weight):
                    nn.init.normal_(w, std=cfg.init_std)
                nn.init.normal_(module.wo.weight, std=out_std)

    def forward(self, tokens: torch.Tensor, doc_start: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V); with targets (B, T), the mean next-token loss (fp32) instead."""
        if targets is not None and self.cfg.cms.inner_updates:
            return self.forward_inner_updates(tokens, targets, doc_start)[1]
        x = self.embed(tokens)
        for block in self.blocks:
            x, _ = block(x, doc_start)
        logits = self.head(self.norm(x))
        return logits if targets is None else lm_loss(logits, targets)

    def forward_inner_updates(self, tokens: torch.Tensor, targets: torch.Tensor,
                              doc_start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """HOPE with in-sequence CMS fast-weight updates (spec 1.4 proposal, first-order) -> (logits, mean loss).

        The sequence runs in chunks of the smallest inner_chunk C, carrying the mixer states. Every sequence of
        the batch has its own fast weights for the adapting levels, starting from the meta-learned ones. After
        the chunk ending at position e, the gradient of the chunk's summed next-token loss w.r.t. the fast weights
        as read in that chunk (mixer states carried in from earlier chunks count as constants) is added to each
        level's sum; a level whose inner_chunk divides e then steps
        theta <- theta - inner_lr * sum (its weights were frozen over its own inner_chunk tokens, so the sum is
        spec 1.4's sum over them). The step is detached: the outer gradient reaches the meta-learned weights
        through the reads only. A document start (only allowed at multiples of C) restores the meta-learned
        weights of its sequence.
        """
        cfg = self.cfg.cms
        B, T = tokens.shape
        C = cfg.inner_chunk
        if doc_start is not None:
            starts = doc_start[:, 1:].nonzero()[:, 1] + 1
            if (starts % C).any():
                raise ValueError(f"with model.cms.inner_updates, document starts must fall on multiples of the "
                                 f"inner chunk ({C} tokens); got starts at {sorted(set(starts.tolist()))}")
        period = {l: lvl.inner_chunk for l, lvl in enumerate(cfg.levels) if lvl.inner_chunk > 0}
        keys = [(i, l) for i in range(len(self.blocks)) for l in period]
        init = {(i, l): dict(self.blocks[i].cms.levels[l].mlp.named_parameters()) for i, l in keys}

        def fresh(i: int, l: int) -> FastWeights:
            return {n: p.expand(B, *p.shape) for n, p in init[(i, l)].items()}

        outer = torch.is_grad_enabled()  # without an outer backward, cut the graph at every chunk
        fast = {key: fresh(*key) for key in keys}
        grad_sum = {key: {n: torch.zeros_like(w) for n, w in fast[key].items()} for key in keys}
        states: list = [None] * len(self.blocks)
        all_logits, loss_sum = [], 0.0
        with torch.enable_grad():
            for s in range(0, T, C):
                e = min(s + C, T)
                doc = None if doc_start is None else doc_start[:, s:e]
                if doc is not None and s > 0:
                    restart = doc[:, 0].view(B, 1, 1)
                    for key in keys:
                        fast[key] = {n: torch.where(restart, w0, fast[key][n]) for n, w0 in fresh(*key).items()}
                        grad_sum[key] = {n: torch.where(restart, 0.0, g) for n, g in grad_sum[key].items()}
                if not outer:
                    fast = {key: {n: w.detach().requires_grad_() for n, w in ws.items()} for key, ws in fast.items()}
                    states = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, states)
                # this chunk's reads: the inner gradient flows through them only (carried states are constants)
                read = {key: {n: w.view_as(w) for n, w in ws.items()} for key, ws in fast.items()}
                x = self.embed(tokens[:, s:e])
                for i, block in enumerate(self.blocks):
                    x, states[i] = block(x, doc, states[i], {l: read[(i, l)] for l in period})
                logits = self.head(self.norm(x))
                chunk_loss = lm_loss(logits, targets[:, s:e], reduction="sum")
                all_logits.append(logits if outer else logits.detach())
                loss_sum = loss_sum + (chunk_loss if outer else chunk_loss.detach())
                if e == T:
                    break
                flat = [(key, n) for key in keys for n in read[key]]
                grads = torch.autograd.grad(chunk_loss, [read[key][n] for key, n in flat], retain_graph=outer)
                for (key, n), g in zip(flat, grads):
                    grad_sum[key][n] = grad_sum[key][n] + g
                for key in keys:
                    if e % period[key[1]] == 0:
                        fast[key] = {n: w - cfg.inner_lr * grad_sum[key][n] for n, w in fast[key].items()}
                        grad_sum[key] = {n: torch.zeros_like(g) for n, g in grad_sum[key].items()}
        n_targets = (targets != IGNORE_INDEX).sum()
        return torch.cat(all_logits, dim=1), loss_sum / n_targets
