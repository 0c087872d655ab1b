"""Closed-form parameter counts and analytic FLOPs per token, from the config alone (no model is built).

`python -m megatron_hope.model.summary --config configs/hope_1b3.toml [--seq-len N] [--model.a=b ...]` prints
them as `key: value` lines (a config error or a --seq-len below 1: one `error:` line, exit status 2). FLOPs
count matmuls only, 2*m*n*k each, as torch.utils.flop_counter does; causal attention counts the full T x T score
and value products (the usual MFU convention). Training is 3x forward (backward = grads w.r.t. inputs and
weights); the extra per-chunk backward passes of in-sequence CMS updates are not counted.
"""
from __future__ import annotations

import argparse
import sys

from megatron_hope.config import ModelConfig, load
from megatron_hope.config_base import ConfigError
from megatron_hope.model.titans import mixer_forward_flops


def mixer_parameters(cfg: ModelConfig, self_modifying: bool) -> int:
    """Parameters of one memory mixer (model/titans.py): input projection to q/k/v(/gate) streams and their conv,
    per-head output norm, gate and output projection, the meta-learned initial memories, and the gate maps."""
    d, H, w = cfg.d_model, cfg.n_heads, cfg.head_dim
    memory = w * w if cfg.memory.kind == "linear" else 2 * w * cfg.memory.hidden_mult * w  # one head's memory
    n_streams = 4 if self_modifying else 3
    shared = n_streams * d * d + n_streams * d * cfg.conv_width + w + 2 * d * d
    if not self_modifying:  # one memory per head; eta, alpha, beta from a linear map of x
        return shared + H * memory + 3 * H * (d + 1)
    n_memories = (5 if cfg.memory.adaptive_q else 4) + 1  # generators M_k, M_v, M_eta, M_alpha (M_q) + M_mem
    # beta from a linear map of x; eta and alpha read out of their memories' outputs (weight + bias per head)
    return shared + H * n_memories * memory + H * (d + 1) + 2 * H * (w + 1)


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per part: embedding, mixer (attention for Transformer++), ffn or cms.level{l}, norms, head, total.

    A CMS level's count includes its own pre-norm (the whole level is one unit for the trainer); `norms` holds the
    blocks' other pre-norms and the final norm; `head` is 0 when tied to the embedding."""
    d, L = cfg.d_model, cfg.n_layers
    parts = {"embedding": cfg.vocab_size * d}
    if cfg.arch == "transformerpp":
        parts["mixer"] = L * 4 * d * d
    else:
        parts["mixer"] = L * mixer_parameters(cfg, self_modifying=cfg.arch == "hope")
    if cfg.arch == "hope":
        for l, lvl in enumerate(cfg.cms.levels):
            parts[f"cms.level{l}"] = L * (3 * d * lvl.hidden + d)
        parts["norms"] = L * d + d
    else:
        parts["ffn"] = L * 3 * d * cfg.ffn_hidden
        parts["norms"] = 2 * L * d + d
    parts["head"] = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    parts["total"] = sum(parts.values())
    return parts


def block_forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward matmul FLOPs per token of one block (token mixer + MLP or CMS) on sequences of `seq_len` tokens."""
    d = cfg.d_model
    if cfg.arch == "transformerpp":
        mixer = 2 * 4 * d * d + 2 * 2 * seq_len * d  # q, k, v, o projections; scores Q K^T and weights @ V
    else:
        mixer = mixer_forward_flops(cfg, seq_len, self_modifying=cfg.arch == "hope")
    if cfg.arch == "hope":
        mlp = sum(2 * 3 * d * lvl.hidden for lvl in cfg.cms.levels)
    else:
        mlp = 2 * 3 * d * cfg.ffn_hidden
    return mixer + mlp


def head_forward_flops_per_token(cfg: ModelConfig) -> float:
    """Forward matmul FLOPs per token of the LM head (the embedding is a lookup: none)."""
    return 2 * cfg.d_model * cfg.vocab_size


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward matmul FLOPs per token of the whole LM on sequences of `seq_len` tokens."""
    return cfg.n_layers * block_forward_flops_per_token(cfg, seq_len) + head_forward_flops_per_token(cfg)


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward matmul FLOPs per token (3x forward): the numerator of MFU."""
    return 3 * forward_flops_per_token(cfg, seq_len)


def main(argv: list[str] | None = None) -> int:
    """Print the summary; 2 with one `error:` line for a config error or a sequence length below 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="TOML preset, e.g. configs/hope_1b3.toml")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default max_seq_len)")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load(args.config, overrides).model
        if args.seq_len is not None and args.seq_len < 1:
            raise ConfigError(f"--seq-len {args.seq_len}: the sequence length must be at least 1 (or leave it out "
                              f"for model.max_seq_len, {cfg.max_seq_len})")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seq_len = cfg.max_seq_len if args.seq_len is None else args.seq_len
    print(f"arch: {cfg.arch}")
    for part, n in count_parameters(cfg).items():
        print(f"params_{part}: {n}")
    print(f"seq_len: {seq_len}")
    print(f"forward_flops_per_token: {forward_flops_per_token(cfg, seq_len):.6g}")
    print(f"training_flops_per_token: {training_flops_per_token(cfg, seq_len):.6g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
