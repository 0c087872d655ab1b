"""Fixtures for the data pipeline tests: a tiny synthetic corpus, a tiny tokenizer, prepared shards."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.tokenizer import train_tokenizer
from data_helpers import VOCAB, make_documents


@pytest.fixture(scope="session")
def docs() -> list[str]:
    return make_documents(160, seed=1)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory, docs) -> Path:
    """The documents split over a .jsonl and a form-feed separated .txt file."""
    root = tmp_path_factory.mktemp("corpus")
    half = len(docs) // 2
    with open(root / "a.jsonl", "w") as f:
        for d in docs[:half]:
            f.write(json.dumps({"text": d}) + "\n")
    (root / "b.txt").write_text("\n\f\n".join(docs[half:]) + "\n")
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_dir) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([corpus_dir], out, vocab_size=VOCAB, model_type="bpe", threads=1)
    return out


@pytest.fixture(scope="session")
def sp(tokenizer_dir) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus_dir, tokenizer_dir) -> Path:
    """Prepared shards: about 600 tokens per shard, so there are many shards. Tests must not modify it."""
    out = tmp_path_factory.mktemp("shards")
    prepare(PrepareConfig([str(corpus_dir)], str(tokenizer_dir), str(out), shard_tokens=600, workers=1,
                          val_fraction=0.05))
    return out


