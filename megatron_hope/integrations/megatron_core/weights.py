"""Weights between the native HopeLM and megatron-core's GPTModel built with this plug-in's layer specs.

    to_megatron(HopeLM.state_dict(), cfg, tp)      -> [state dict of TP rank r for r in range(tp)]
    from_megatron([rank 0 state dict, ...], cfg)   -> HopeLM state dict

Each megatron-core tensor has a rule: the native tensors it comes from, how they are packed into the
megatron-core layout at TP=1 (head-major in_proj/conv rows, fused qkv, fused SwiGLU gate+up), and how that
splits across TP ranks: replicated, column-parallel (dim 0), row-parallel (dim 1), or SwiGLU (each rank holds
its slice of the gate rows followed by its slice of the up rows, as megatron-core's MLP expects).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from megatron_hope.config import ModelConfig
from megatron_hope.ops.memory import MemoryOptions, matrix_names

Split = Literal["rep", "col", "row", "glu"]


@dataclass(frozen=True)
class Rule:
    megatron: str
    native: tuple[str, ...]
    split: Split
    pack: Callable[[list[Tensor]], Tensor] = lambda ts: ts[0]
    unpack: Callable[[Tensor], list[Tensor]] = lambda t: [t]


def _swiglu(n: str, m: str) -> list[Rule]:
    return [Rule(f"{m}linear_fc1.weight", (f"{n}w_gate.weight", f"{n}w_up.weight"), "glu",
                 torch.cat, lambda t: list(t.chunk(2))),
            Rule(f"{m}linear_fc2.weight", (f"{n}w_down.weight",), "row")]


def _mixer(cfg: ModelConfig, n: str, m: str) -> list[Rule]:
    hope = cfg.arch == "hope"
    rules = [Rule(f"{m}in_proj.weight", (f"{n}in_proj.weight",), "col"),  # both head-major
             Rule(f"{m}conv.weight", (f"{n}conv.weight",), "col"),
             Rule(f"{m}out_norm.weight", (f"{n}out_norm.weight",), "rep"),
             Rule(f"{m}gate.weight", (f"{n}gate.weight",), "col"),
             Rule(f"{m}out_proj.weight", (f"{n}out_proj.weight",), "row")]
    matrices = matrix_names(MemoryOptions(kind=cfg.memory.kind))
    per_head = [f"mem_init.{x}" for x in matrices]
    if hope:
        per_head += [f"gen_init.{x}" for x in matrices]
        per_head += ["beta_proj.weight", "beta_proj.bias", "eta_readout", "eta_bias", "alpha_readout", "alpha_bias"]
    else:
        rules += [Rule(f"{m}gate_proj.{x}", (f"{n}gate_proj.{x}",), "col") for x in ("weight", "bias")]
    return rules + [Rule(f"{m}{x}", (f"{n}{x}",), "col") for x in per_head]


def _attention(cfg: ModelConfig, n: str, m: str) -> list[Rule]:
    """wq, wk, wv -> megatron-core's fused linear_qkv, rows [head, (q, k, v), head_dim]."""
    H, hd, d = cfg.n_heads, cfg.head_dim, cfg.d_model
    pack = lambda ts: torch.stack([t.reshape(H, hd, d) for t in ts], 1).reshape(3 * d, d)  # noqa: E731
    unpack = lambda t: [x.reshape(d, d) for x in t.reshape(H, 3, hd, d).unbind(1)]  # noqa: E731
    return [Rule(f"{m}linear_qkv.weight", tuple(f"{n}{x}.weight" for x in ("wq", "wk", "wv")), "col", pack, unpack),
            Rule(f"{m}linear_proj.weight", (f"{n}wo.weight",), "row")]


def rules(cfg: ModelConfig) -> list[Rule]:
    out = [Rule("embedding.word_embeddings.weight", ("embed.weight",), "col"),
           Rule("decoder.final_layernorm.weight", ("norm.weight",), "rep")]
    if not cfg.tie_embeddings:
        out.append(Rule("output_layer.weight", ("head.weight",), "col"))
    for i in range(cfg.n_layers):
        n, m = f"blocks.{i}.", f"decoder.layers.{i}."
        if cfg.arch == "transformerpp":
            out += [Rule(f"{m}input_layernorm.weight", (f"{n}attn_norm.weight",), "rep")]
            out += _attention(cfg, f"{n}attn.", f"{m}self_attention.")
        else:
            out += [Rule(f"{m}input_layernorm.weight", (f"{n}mixer_norm.weight",), "rep")]
            out += _mixer(cfg, f"{n}mixer.", f"{m}self_attention.")
        if cfg.arch == "hope":
            for lvl in range(len(cfg.cms.levels)):
                n_l, m_l = f"{n}cms.levels.{lvl}.", f"{m}mlp.levels.{lvl}."
                out += [Rule(f"{m_l}norm.weight", (f"{n_l}norm.weight",), "rep")]
                out += _swiglu(f"{n_l}mlp.", f"{m_l}mlp.")
        else:
            out += [Rule(f"{m}pre_mlp_layernorm.weight", (f"{n}mlp_norm.weight",), "rep")]
            out += _swiglu(f"{n}mlp.", f"{m}mlp.")
    return out


def _shard(t: Tensor, split: Split, tp: int, rank: int) -> Tensor:
    if split == "rep":
        return t
    if split == "glu":
        return torch.cat([half.chunk(tp)[rank] for half in t.chunk(2)])
    return t.chunk(tp, dim=0 if split == "col" else 1)[rank]


def _merge(shards: list[Tensor], split: Split, name: str) -> Tensor:
    if split == "rep":
        if any(not torch.equal(s, shards[0]) for s in shards[1:]):
            raise ValueError(f"{name} is replicated across TP ranks but the ranks' copies differ")
        return shards[0]
    if split == "glu":
        gates, ups = zip(*(s.chunk(2) for s in shards))
        return torch.cat([*gates, *ups])
    return torch.cat(shards, dim=0 if split == "col" else 1)


def _check_all_used(given, used: set[str], what: str) -> None:
    left = sorted(k for k in given if k not in used and not k.endswith("_extra_state"))
    if left:
        raise KeyError(f"{what} tensors without a mapping rule: {left}")


def to_megatron(native: dict[str, Tensor], cfg: ModelConfig, tp: int = 1) -> list[dict[str, Tensor]]:
    """Native HopeLM state dict -> one megatron-core GPTModel state dict per TP rank (load each with
    strict=True into the rank's model)."""
    out: list[dict[str, Tensor]] = [{} for _ in range(tp)]
    table = rules(cfg)
    for rule in table:
        full = rule.pack([native[name].detach() for name in rule.native])
        for rank in range(tp):
            out[rank][rule.megatron] = _shard(full, rule.split, tp, rank).clone()
    tied = {"head.weight"} if cfg.tie_embeddings else set()
    _check_all_used(native, {n for rule in table for n in rule.native} | tied, "native")
    return out


def from_megatron(ranks: list[dict[str, Tensor]], cfg: ModelConfig) -> dict[str, Tensor]:
    """megatron-core GPTModel state dicts of TP ranks 0..tp-1 -> the native HopeLM state dict."""
    native: dict[str, Tensor] = {}
    table = rules(cfg)
    for rule in table:
        full = _merge([sd[rule.megatron].detach() for sd in ranks], rule.split, rule.megatron)
        native.update(zip(rule.native, (t.clone() for t in rule.unpack(full))))
    if cfg.tie_embeddings:
        native["head.weight"] = native["embed.weight"]
    for sd in ranks:
        _check_all_used(sd, {rule.megatron for rule in table}, "megatron-core")
    return native
