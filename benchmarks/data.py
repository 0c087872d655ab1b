"""Data pipeline throughput: `python -m benchmarks.data`.

Prints `key: value` lines:
  prepare_tokens_per_s          text -> shards with --workers tokenizer processes (whole command, incl. val hashing)
  loader_tokens_per_s           one process reading shards and packing (micro_batch x seq_len) batches, DP size 1
  loader_vs_goal                loader_tokens_per_s / 1e6
  loader_dp8_rank_tokens_per_s  tokens one rank of 8 yields per second (it scans the whole stream, packs 1/8)
  fast_forward_tokens_per_s     stream positions skipped per second when resuming 90 % into an epoch
  other_cpu_cores               CPU used by other processes meanwhile, in cores (the VM is shared; Linux only)
Each figure is the median of --runs timed runs after one warm-up run.
The default corpus is synthetic (Zipf-distributed pseudo-words, documents of ~120-1500 tokens), made
in a temporary directory, so the benchmark needs no download; --corpus DIR measures real text instead.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit, median_seconds
from data_pipeline.dataset import LoaderConfig, PackedTokenDataset
from data_pipeline.manifest import Manifest
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.tokenizer import train_tokenizer

GOAL = 1e6


def synthetic_corpus(path: Path, documents: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = ["".join(rng.choice("etaoinshrdlcumwfgypbvkjxqz") for _ in range(rng.randint(1, 9))) for _ in range(20000)]
    cum_weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))
    with open(path, "w") as f:
        for _ in range(documents):
            n = int(rng.lognormvariate(5.7, 0.6))  # words; about 1.3 tokens each
            f.write(json.dumps({"text": " ".join(rng.choices(words, cum_weights=cum_weights, k=n))}) + "\n")


class OtherLoad:
    """Measures the CPU time other processes used during a `with` block, in cores (from /proc/stat)."""

    def _machine_busy_s(self) -> float:
        with open("/proc/stat") as f:
            user, nice, system = (int(v) for v in f.readline().split()[1:4])
        return (user + nice + system) / os.sysconf("SC_CLK_TCK")

    def _own_cpu_s(self) -> float:
        return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                      resource.getrusage(resource.RUSAGE_CHILDREN)))

    def __enter__(self) -> OtherLoad:
        self.start = (self._machine_busy_s(), self._own_cpu_s(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own, wall = (b - a for a, b in zip(self.start, (self._machine_busy_s(), self._own_cpu_s(),
                                                              time.perf_counter())))
        self.cores = max(0.0, (busy - own) / wall)


def loader_pass(cfg: LoaderConfig, dp_size: int = 1) -> int:
    """Tokens (micro_batch x seq_len per batch) yielded by rank 0 over one epoch."""
    return sum(b["tokens"].shape[0] * cfg.seq_len for b in PackedTokenDataset(cfg, 0, dp_size))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=None, help="text directory (default: synthetic)")
    parser.add_argument("--documents", type=int, default=6000, help="synthetic documents")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = args.corpus
        if corpus is None:
            corpus = work / "corpus.jsonl"
            synthetic_corpus(corpus, args.documents)
        train_tokenizer([corpus], work / "tok", vocab_size=args.vocab_size)

        def run_prepare() -> None:
            prepare(PrepareConfig([str(corpus)], str(work / "tok"), str(work / "shards"), shard_tokens=250_000,
                                  workers=args.workers, overwrite=True))

        with OtherLoad() as prepare_load:
            prepare_s = median_seconds(run_prepare, args.runs)
        manifest = Manifest.load(work / "shards")
        total = sum(s.tokens for s in manifest.splits.values())
        train = manifest.split("train")
        emit("corpus", f"{'synthetic' if args.corpus is None else args.corpus.name}, {train.documents} train "
                       f"documents, {train.tokens} tokens, {len(train.shards)} shards")
        emit("prepare_tokens_per_s", total / prepare_s)
        emit("prepare_workers", args.workers)
        emit("prepare_other_cpu_cores", prepare_load.cores)

        cfg = LoaderConfig(str(work / "shards"), seq_len=args.seq_len, micro_batch=args.micro_batch, loop=False)
        yielded, rank_tokens = loader_pass(cfg), loader_pass(cfg, dp_size=8)
        skipped = int(0.9 * yielded / args.seq_len)  # samples to skip: 90 % of the epoch

        def first_batch_after_resume() -> None:
            ds = PackedTokenDataset(cfg)
            ds.load_state_dict({**ds.state_dict(), "consumed_samples": skipped})
            next(iter(ds))

        with OtherLoad() as loader_load:
            loader_s = median_seconds(lambda: loader_pass(cfg), args.runs)
            rank_s = median_seconds(lambda: loader_pass(cfg, 8), args.runs)
            forward_s = median_seconds(first_batch_after_resume, args.runs)
        emit("loader_tokens_per_s", yielded / loader_s)
        emit("loader_vs_goal", yielded / loader_s / GOAL)
        emit("loader_dp8_rank_tokens_per_s", rank_tokens / rank_s)
        emit("fast_forward_tokens_per_s", skipped * args.seq_len / forward_s)
        emit("loader_other_cpu_cores", loader_load.cores)
        emit("batch", f"micro_batch {args.micro_batch} x seq_len {args.seq_len}; "
                      f"median of {args.runs} runs after 1 warm-up")


if __name__ == "__main__":
    main()
