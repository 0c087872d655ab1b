"""Quality at equal parameter count: HOPE, Titans and Transformer++ (~10M each, benchmarks/models.py shapes) trained
on the same tokens of the bundled Jane Austen corpus; validation loss and perplexity of each, and a loss-curve PNG.

    python -m benchmarks.quality [--steps 120 --batch 4 --seq-len 256 --eval-batches 12 --out runs/quality-<time>]

Data: corpus, tokenizer (BPE, --vocab-size = the models' vocabulary) and shards are built once into --data-dir
with the data_pipeline APIs and reused afterwards. Training: the three models start from the same seed and take
turns step by step on the very same batch (one loader, train split, seed 0), so they see identical tokens in
identical order; AdamW with decay on matrices only (megatron_hope.training.optimizer), linear warmup then cosine
decay to lr/10 (megatron_hope.training.schedule), global gradient clipping at 1.0, fp32. Validation: the first
--eval-batches batches of the val split (the same batches for every model and every evaluation), every
--eval-every steps and at the end. HOPE's CMS levels (periods 1/4/16 in the config) are all updated at every
optimizer step: this script does not apply the levels' outer periods (schedule-aware accumulation).

Prints `key: value` lines (val_loss_<arch>, val_ppl_<arch>, ...; progress goes to stderr) and writes
loss_curves.png and metrics.json into --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from itertools import islice
from pathlib import Path

import torch

from benchmarks.common import emit
from benchmarks.models import equal_size_configs
from data_pipeline.corpus import materialise
from data_pipeline.dataset import LoaderConfig, PackedTokenDataset
from data_pipeline.manifest import Manifest
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.tokenizer import train_tokenizer
from megatron_hope.config import ModelConfig, OptimConfig
from megatron_hope.model.lm import HopeLM
from megatron_hope.model.summary import count_parameters
from megatron_hope.training.grad_clip import clip_grad_norm
from megatron_hope.training.loop import batch_loss, evaluate, perplexity
from megatron_hope.training.optimizer import build_optimizer
from megatron_hope.training.schedule import lr_lambda

ARCHS = ("hope", "titans", "transformerpp")
CHUNK = 64  # memory chunk of HOPE and Titans (as in benchmarks.models)


def ensure_data(data_dir: Path, vocab_size: int, corpus: Path | None) -> Path:
    """Corpus (bundled unless `corpus` is given), tokenizer and shards under data_dir, each built only when missing.
    Returns the shards directory."""
    if corpus is None:
        corpus = data_dir / "corpus"
        if not (corpus / "corpus.json").exists():
            materialise(corpus)
    tok, shards = data_dir / f"tokenizer{vocab_size}", data_dir / f"shards{vocab_size}"
    if not (tok / "card.json").exists():
        train_tokenizer([corpus], tok, vocab_size=vocab_size, model_type="bpe", threads=2)
    if not (shards / "manifest.json").exists():
        prepare(PrepareConfig([str(corpus)], str(tok), str(shards), shard_tokens=200_000, workers=2,
                              val_fraction=0.05, overwrite=True))
    return shards


def model_configs(seq_len: int, vocab_size: int) -> dict[str, ModelConfig]:
    """benchmarks.models' equal-size shapes with the tokenizer's vocabulary (the same embedding in all three, so the
    totals stay equal)."""
    return {arch: dataclasses.replace(cfg, vocab_size=vocab_size)
            for arch, cfg in equal_size_configs(seq_len, CHUNK).items()}


def plot(curves: dict, tokens_per_step: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for arch, color in zip(ARCHS, ("tab:red", "tab:blue", "tab:green")):
        train = curves[arch]["train"]
        x = [tokens_per_step * (i + 1) for i in range(len(train))]
        ax.plot(x, train, color=color, alpha=0.25, linewidth=0.8)
        window = max(1, len(train) // 20)  # running mean over the last `window` steps
        smooth = [sum(train[max(0, i - window + 1):i + 1]) / len(train[max(0, i - window + 1):i + 1])
                  for i in range(len(train))]
        ax.plot(x, smooth, color=color, label=f"{arch} train (mean of {window} steps)")
        val_x, val_y = zip(*[(tokens_per_step * s, v) for s, v in curves[arch]["val"]])
        ax.plot(val_x, val_y, "o--", color=color, markersize=6, label=f"{arch} val")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("HOPE vs Titans vs Transformer++, ~10M parameters, same tokens (Austen corpus)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps (each model)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-batches", type=int, default=12, help="val batches of --batch x --seq-len")
    parser.add_argument("--eval-every", type=int, default=40, help="steps between evaluations (and at the end)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak lr; decays to lr/10")
    parser.add_argument("--warmup", type=int, default=12, help="linear warmup steps")
    parser.add_argument("--seed", type=int, default=0, help="model init and loader order")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; 1: on the shared 2-vCPU VM two threads made the memory "
                             "models 4-7x slower whenever other jobs ran (see BENCHMARKS.md)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="tokenizer and model vocabulary")
    parser.add_argument("--data-dir", type=Path, default=Path("runs/quality_data"), help="data cache")
    parser.add_argument("--corpus", type=Path, default=None, help="text to use instead of the bundled corpus")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default runs/quality-<time>)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "seq_len", "eval_batches", "eval_every", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    wall_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / time.strftime("quality-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")

    shards = ensure_data(args.data_dir, args.vocab_size, args.corpus)
    manifest = Manifest.load(shards)
    optim = OptimConfig(lr=args.lr, min_lr=args.lr / 10, warmup_steps=args.warmup, schedule="cosine",
                        weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0)
    optim.validate(args.steps)
    tokens_per_step = args.batch * args.seq_len
    for key, value in [("device", "cpu"), ("threads", torch.get_num_threads()), ("data", shards),
                       ("train_split_tokens", manifest.split("train").tokens), ("vocab_size", args.vocab_size),
                       ("steps", args.steps), ("batch", args.batch), ("seq_len", args.seq_len),
                       ("lr", args.lr), ("min_lr", optim.min_lr), ("warmup_steps", args.warmup),
                       ("weight_decay", optim.weight_decay), ("grad_clip", optim.grad_clip),
                       ("tokens_seen", args.steps * tokens_per_step)]:
        emit(key, value)

    configs = model_configs(args.seq_len, args.vocab_size)
    models, optimizers, schedulers = {}, {}, {}
    for arch, cfg in configs.items():
        torch.manual_seed(args.seed)
        models[arch] = HopeLM(cfg).to(device).train()
        optimizers[arch] = build_optimizer(models[arch], optim)
        schedulers[arch] = torch.optim.lr_scheduler.LambdaLR(optimizers[arch], lr_lambda(optim, args.steps))
        emit(f"params_{arch}", count_parameters(cfg)["total"])

    def loader(split: str, loop: bool) -> PackedTokenDataset:
        return PackedTokenDataset(LoaderConfig(str(shards), seq_len=args.seq_len, micro_batch=args.batch,
                                               split=split, seed=args.seed, loop=loop))

    val = list(islice(loader("val", loop=False), args.eval_batches))  # the same batches at every evaluation
    emit("val_tokens", len(val) * tokens_per_step)
    train = iter(loader("train", loop=True))
    curves = {arch: {"train": [], "val": []} for arch in ARCHS}
    seconds = dict.fromkeys(ARCHS, 0.0)
    skipped = dict.fromkeys(ARCHS, 0)
    for step in range(1, args.steps + 1):
        batch = next(train)
        for arch, model in models.items():
            start = time.perf_counter()
            loss = batch_loss(model, batch, device)
            loss.backward()
            norm = clip_grad_norm(list(model.parameters()), optim.grad_clip)
            if math.isfinite(loss.item()) and math.isfinite(norm.item()):
                optimizers[arch].step()
            else:  # as the trainer does: no update on a non-finite loss or gradient
                skipped[arch] += 1
            optimizers[arch].zero_grad(set_to_none=True)
            schedulers[arch].step()
            seconds[arch] += time.perf_counter() - start
            curves[arch]["train"].append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            for arch, model in models.items():
                curves[arch]["val"].append((step, evaluate(model, val, len(val), device)))
        line = " | ".join(f"{arch} {curves[arch]['train'][-1]:.3f}" for arch in ARCHS)
        print(f"step {step}/{args.steps} | train loss {line} | {sum(seconds.values()):.0f} s", file=sys.stderr,
              flush=True)

    for arch in ARCHS:
        val_loss = curves[arch]["val"][-1][1]
        emit(f"val_loss_{arch}", val_loss)
        emit(f"val_ppl_{arch}", perplexity(val_loss))
        emit(f"train_tokens_per_s_{arch}", args.steps * tokens_per_step / seconds[arch])
        if skipped[arch]:
            emit(f"skipped_steps_{arch}", skipped[arch])
    ranking = sorted(ARCHS, key=lambda a: curves[a]["val"][-1][1])
    emit("val_ranking", " < ".join(ranking))
    (out / "metrics.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "tokens_per_step": tokens_per_step, "curves": curves,
                                                  "train_seconds": seconds}, indent=1) + "\n")
    plot(curves, tokens_per_step, out / "loss_curves.png")
    emit("wall_seconds", time.perf_counter() - wall_start)
    emit("metrics", out / "metrics.json")
    emit("plot", out / "loss_curves.png")


if __name__ == "__main__":
    main()
