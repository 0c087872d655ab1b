"""Command-line smoke test: tokenizer train -> prepare (2 workers) -> loader, as a user runs them."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from data_pipeline.dataset import LoaderConfig, PackedTokenDataset
from data_pipeline.manifest import Manifest
from data_helpers import REPO, take


def run(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_tokenizer_and_prepare_commands(tmp_path, corpus_dir, docs):
    out = run("data_pipeline.tokenizer", "train", "--input", str(corpus_dir / "a.jsonl"), str(corpus_dir / "b.txt"),
              "--vocab-size", "350", "--model-type", "bpe", "--out", str(tmp_path / "tok"), "--threads", "1")
    assert "vocab 350" in out and (tmp_path / "tok" / "card.json").is_file()
    out = run("data_pipeline.prepare", "--input", str(corpus_dir), "--tokenizer", str(tmp_path / "tok"),
              "--out", str(tmp_path / "shards"), "--shard-tokens", "2000", "--workers", "2", "--val-fraction", "0.1")
    manifest = Manifest.load(tmp_path / "shards")
    train, val = manifest.split("train"), manifest.split("val")
    assert f"train: {train.documents} documents, {train.tokens} tokens, {len(train.shards)} shard(s)" in out
    assert train.documents + val.documents == len(docs) and len(train.shards) > 1 and val.documents > 0
    batch = take(PackedTokenDataset(LoaderConfig(str(tmp_path / "shards"), seq_len=32, micro_batch=4)), 1)[0]
    assert batch["tokens"].shape == (4, 33) and batch["doc_start"].shape == (4, 32)
    assert batch["doc_start"][0, 0] and np.all(batch["tokens"].numpy() < 350)
