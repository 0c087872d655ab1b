"""The language model: embedding -> blocks (HOPE, Titans or Transformer++) -> final RMSNorm -> LM head."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from megatron_hope.config import ModelConfig
from megatron_hope.model.attention import CausalSelfAttention
from megatron_hope.model.blocks import BLOCKS
from megatron_hope.model.cms import CMSFastWeights
from megatron_hope.model.layers import CausalDepthwiseConv1d, RMSNorm, RotaryEmbedding, SwiGLU
from megatron_hope.model.titans import SelfModifyingTitans, TitansMixer
from megatron_hope.ops.packing import DocumentLayout

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
        """Normal(0, init_std) for the embedding and every linear weight; the projections that write into the
        residual stream get init_std / sqrt(number of residual branches), as GPT-2/Megatron scale by
        1/sqrt(2 n_layers) for two branches per layer (HOPE has 1 + n_levels). Norms, convs, rotary tables and
        the mixers' memory initial states and gate maps are reset by their modules, so a model built on the
        meta device and materialised with `to_empty` initialises completely here."""
        cfg = self.cfg
        if cfg.tie_embeddings:  # again here: materialising a meta-device model unties them
            self.head.weight = self.embed.weight
        for module in self.modules():
            if isinstance(module, (RMSNorm, CausalDepthwiseConv1d, RotaryEmbedding)):
                module.reset_parameters()
            elif isinstance(module, (SelfModifyingTitans, TitansMixer)):
                module.reset_memory_parameters()
        branches_per_layer = 1 + (len(cfg.cms.levels) if cfg.arch == "hope" else 1)
        out_std = cfg.init_std / math.sqrt(branches_per_layer * cfg.n_layers)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.head.weight, std=cfg.init_std)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=cfg.init_std)
        for proj in self._residual_projections():
            nn.init.normal_(proj.weight, std=out_std)

    def _residual_projections(self) -> list[nn.Linear]:
        out = []
        for module in self.blocks.modules():
            if isinstance(module, SwiGLU):
                out.append(module.w_down)
            elif isinstance(module, CausalSelfAttention):
                out.append(module.wo)
            elif isinstance(module, (SelfModifyingTitans, TitansMixer)):
                out.append(module.out_proj)
        return out

    def forward(self, tokens: torch.Tensor, doc_start: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V); with targets (B, T), the mean next-token loss (fp32) instead.
        doc_start (B, T) bool marks document starts: nothing crosses them. With model.cms.inner_updates on and
        targets given, the CMS levels also learn in-sequence (forward_inner_updates)."""
        if targets is not None and self.cfg.cms.inner_updates:
            return self.forward_inner_updates(tokens, targets, doc_start)[1]
        if doc_start is not None and not doc_start[:, 1:].any():
            # one host sync per forward instead of one per layer: with no document starting inside the
            # sequence, attention takes its causal kernel and the memories skip their reset paths
            doc_start = None
        x = self.embed(tokens)
        for block in self.blocks:
            x, _ = block(x, doc_start)
        logits = self.head(self.norm(x))
        return logits if targets is None else lm_loss(logits, targets)

    def forward_inner_updates(self, tokens: torch.Tensor, targets: torch.Tensor,
                              doc_start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """HOPE with in-sequence CMS fast-weight updates (spec 1.4 proposal, first-order) -> (logits, mean loss).

        The sequence runs in chunks of the smallest inner_chunk C, carrying the mixer states (memory and conv
        tail; C is a multiple of the memory chunk, so the mixers compute what one call over the sequence would,
        and with inner_lr = 0 this is the plain forward); every sequence of the batch has its own fast weights,
        updated after each chunk from that chunk's next-token loss (see CMSFastWeights). A document start
        restores the meta-learned weights and starts a chunk: documents are laid out to start at multiples of C
        (ops/packing.py), so a packed document computes what it computes alone.
        """
        C = self.cfg.cms.inner_chunk
        # not rounded: a trailing chunk of pads would cost a whole-model step (this loop is not compiled)
        layout = DocumentLayout.build(doc_start, C, rounded=False) if doc_start is not None else None
        if layout is not None:  # every document starts a CMS chunk; the pads before it are not predicted
            tokens, targets = layout.scatter(tokens, -1, 0), layout.scatter(targets, -1, IGNORE_INDEX)
            doc_start = layout.doc_start
        B, T = tokens.shape
        outer = torch.is_grad_enabled()  # without an outer backward, cut the graph at every chunk
        fast = CMSFastWeights(self.blocks, self.cfg.cms, B)
        states: list = [None] * len(self.blocks)
        all_logits, loss_sum = [], 0.0
        with torch.enable_grad():  # the inner gradient is part of the forward
            for s in range(0, T, C):
                doc = None if doc_start is None else doc_start[:, s:s + C]
                if doc is not None and s > 0:
                    fast.restart(doc[:, 0])
                if not outer:
                    fast.detach()
                    states = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, states)
                weights = fast.begin_chunk()
                x = self.embed(tokens[:, s:s + C])
                for i, block in enumerate(self.blocks):
                    x, states[i] = block(x, doc, states[i], weights[i])
                logits = self.head(self.norm(x))
                chunk_loss = lm_loss(logits, targets[:, s:s + C], reduction="sum")
                if s + C < T:
                    fast.end_chunk(chunk_loss, C, retain_graph=outer)
                all_logits.append(logits if outer else logits.detach())
                loss_sum = loss_sum + (chunk_loss if outer else chunk_loss.detach())
        logits = torch.cat(all_logits, dim=1)
        if layout is not None:
            logits = layout.gather(logits, 1)
        return logits, loss_sum / (targets != IGNORE_INDEX).sum()
