"""Fixtures shared by the test directories: the synthetic corpus that training runs read (tests/training,
tests/checkpoints), and a one-rank gloo process group with its mesh. tests/training holds the run helpers
(train_helpers, dump_run); it is put on sys.path so that every directory imports them the same way. A run ends
with the test groups that skipped on this machine and what enables them (skip_report.py). Without a GPU, Triton
kernels run under Triton's interpreter."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels are checked under Triton's interpreter where no GPU is present; it is chosen when a kernel is
# defined, so before any test imports one
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from skip_report import skip_report

TRAINING = Path(__file__).resolve().parent / "training"
if str(TRAINING) not in sys.path:
    sys.path.insert(0, str(TRAINING))


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, Path]:
    """{"tokenizer": dir, "manifest": manifest.json} of a synthetic corpus: 320-token BPE, a few shards."""
    from data_pipeline.prepare import PrepareConfig, prepare
    from data_pipeline.tokenizer import train_tokenizer
    from train_helpers import make_documents  # imported here: it imports the trainer, which most tests never use

    root = tmp_path_factory.mktemp("train_data")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "docs.txt").write_text("\n\f\n".join(make_documents(120, seed=3)) + "\n")
    train_tokenizer([corpus], root / "tok", vocab_size=320, model_type="bpe", threads=1)
    prepare(PrepareConfig([str(corpus)], str(root / "tok"), str(root / "shards"), shard_tokens=4000, workers=1,
                          val_fraction=0.1))
    return {"tokenizer": root / "tok", "manifest": root / "shards" / "manifest.json"}


@pytest.fixture
def one_rank_mesh():
    """A 1-D CPU mesh over a one-rank gloo process group (in-memory store), torn down after the test."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()



def pytest_terminal_summary(terminalreporter):
    """At the end of every run: which test groups were skipped, why, and what enables them."""
    for line in skip_report(terminalreporter.stats.get("skipped", [])):
        terminalreporter.write_line(line)
