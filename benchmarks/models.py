"""Training-step throughput (forward + backward + AdamW) of HOPE, Titans and Transformer++ at equal parameter
count (~10M), side by side in one run; and, when titans-pytorch is installed, HOPE's memory layer against its
NeuralMemory at equal dimensions.

    python -m benchmarks.models [--seq-len 512 --batch 4 --reps 5 --threads N --compile --device cpu]

Prints `key: value` lines: medians of --reps timed steps after two warm-up steps, the models taking turns. The
three shapes share width, depth, heads and vocabulary; HOPE's CMS level width and the baselines' FFN width are
solved for equal parameter counts. Achieved FLOP/s is the analytic training FLOPs per token (the trainer's MFU
numerator, model/summary.py) times tokens/s. --compile compiles each of a model's blocks in place
(parallel/compile.py, as model.compile = true does); the compile happens during the two warm-up steps (a cold compile can take minutes on a CPU).
The titans-pytorch comparison stays eager.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from benchmarks.common import add_run_options, emit, interleaved_median_seconds, start_run
from megatron_hope.config import CMSConfig, CMSLevel, MemoryConfig, ModelConfig
from megatron_hope.model.lm import HopeLM
from megatron_hope.model.summary import count_parameters, training_flops_per_token
from megatron_hope.model.titans import SelfModifyingTitans, TitansMixer
from megatron_hope.parallel.compile import apply_compile

SHAPE = dict(vocab_size=8192, d_model=256, n_layers=10, n_heads=8, tie_embeddings=True)
TRANSFORMERPP_FFN = 704  # ~8/3 d, a multiple of 64: the reference parameter count


def _solve_width(make, target: int, step: int = 16) -> ModelConfig:
    """The config whose width (multiple of `step`) brings the parameter count closest to `target`."""
    return min((make(h) for h in range(step, 16 * SHAPE["d_model"], step)),
               key=lambda cfg: abs(count_parameters(cfg)["total"] - target))


def equal_size_configs(seq_len: int, chunk: int) -> dict[str, ModelConfig]:
    memory = MemoryConfig(chunk_size=chunk)
    tpp = ModelConfig(arch="transformerpp", max_seq_len=seq_len, ffn_hidden=TRANSFORMERPP_FFN, **SHAPE)
    target = count_parameters(tpp)["total"]
    hope = _solve_width(lambda h: ModelConfig(arch="hope", max_seq_len=seq_len, memory=memory, **SHAPE, cms=CMSConfig(
        levels=[CMSLevel(hidden=h, period=p) for p in (1, 4, 16)])), target)
    titans = _solve_width(lambda h: ModelConfig(arch="titans", max_seq_len=seq_len, memory=memory, ffn_hidden=h,
                                                **SHAPE), target)
    return {"hope": hope, "titans": titans, "transformerpp": tpp}


def train_step(cfg: ModelConfig, batch: int, seq_len: int, device: torch.device, compile: bool = False
               ) -> Callable[[], None]:
    """One training step (forward, backward, AdamW) of a freshly initialised model on a fixed random batch; with
    `compile`, each block is compiled in place (on its first call), as model.compile does."""
    torch.manual_seed(0)
    model = HopeLM(cfg).to(device)
    if compile:
        apply_compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)

    def step() -> None:
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def compare_with_titans_pytorch(cfg: ModelConfig, batch: int, seq_len: int, reps: int, device: torch.device) -> None:
    """Forward + backward of one memory layer on the same input: HOPE's self-modifying Titans mixer (and our Titans
    baseline mixer) against titans-pytorch's NeuralMemory (per-head 2-layer MLP memory, same heads, head width,
    hidden width and chunk)."""
    try:
        from titans_pytorch import NeuralMemory
    except ImportError as e:
        emit("titans_pytorch", f"skipped: not importable ({e}); `pip install titans-pytorch` to compare")
        return
    d, H, w = cfg.d_model, cfg.n_heads, cfg.head_dim
    theirs = NeuralMemory(dim=d, heads=H, dim_head=w, chunk_size=cfg.memory.chunk_size,
                          default_model_kwargs=dict(depth=2, expansion_factor=float(cfg.memory.hidden_mult)))
    layers = {"hope_memory_layer": SelfModifyingTitans(cfg), "titans_memory_layer": TitansMixer(cfg),
              "titans_pytorch_neural_memory": theirs}
    layers = {name: layer.to(device) for name, layer in layers.items()}
    x = torch.randn(batch, seq_len, d, device=device, requires_grad=True)
    steps = {name: (lambda layer=layer: layer(x)[0].sum().backward()) for name, layer in layers.items()}
    seconds = interleaved_median_seconds(steps, reps, device)
    for name, layer in layers.items():
        emit(f"{name}_params", sum(p.numel() for p in layer.parameters()))
        emit(f"{name}_fwd_bwd_tokens_per_s", batch * seq_len / seconds[name])
    emit("hope_vs_titans_pytorch_ratio", seconds["titans_pytorch_neural_memory"] / seconds["hope_memory_layer"])
    emit("titans_vs_titans_pytorch_ratio", seconds["titans_pytorch_neural_memory"] / seconds["titans_memory_layer"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=64, help="memory chunk size of HOPE and Titans")
    parser.add_argument("--reps", type=int, default=5)
    add_run_options(parser, "torch.compile each block (during the warm-up)")
    args = parser.parse_args(argv)
    device = start_run(args)
    emit("batch", args.batch)
    emit("seq_len", args.seq_len)
    configs = equal_size_configs(args.seq_len, args.chunk)
    for arch, cfg in configs.items():
        emit(f"{arch}_params", count_parameters(cfg)["total"])
        width = ("cms_level_hidden", cfg.cms.levels[0].hidden) if arch == "hope" else ("ffn_hidden", cfg.ffn_hidden)
        emit(f"{arch}_{width[0]}", width[1])
    steps = {arch: train_step(cfg, args.batch, args.seq_len, device, args.compile) for arch, cfg in configs.items()}
    seconds = interleaved_median_seconds(steps, args.reps, device)
    tokens_per_s = {arch: args.batch * args.seq_len / s for arch, s in seconds.items()}
    for arch, value in tokens_per_s.items():
        emit(f"{arch}_train_tokens_per_s", value)
    emit("hope_vs_transformerpp_tokens_per_s_ratio", tokens_per_s["hope"] / tokens_per_s["transformerpp"])
    emit("titans_vs_transformerpp_tokens_per_s_ratio", tokens_per_s["titans"] / tokens_per_s["transformerpp"])
    flop_rate = {arch: training_flops_per_token(cfg, args.seq_len) * tokens_per_s[arch]
                 for arch, cfg in configs.items()}
    for arch, value in flop_rate.items():
        emit(f"{arch}_achieved_flop_per_s", value)
    emit("hope_vs_transformerpp_flop_rate_ratio", flop_rate["hope"] / flop_rate["transformerpp"])
    compare_with_titans_pytorch(configs["hope"], args.batch, args.seq_len, args.reps, device)


if __name__ == "__main__":
    main()
