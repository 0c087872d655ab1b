"""Text -> shards -> loader reproduces direct sentencepiece tokenization, packed as documented."""
from __future__ import annotations

import hashlib
import shutil
from collections import Counter

import numpy as np

from data_pipeline.dataset import LoaderConfig, PackedTokenDataset
from data_pipeline.manifest import Manifest, token_dtype
from data_pipeline.prepare import PrepareConfig, prepare
from data_helpers import read_tar_documents, split_documents, stream_of, take, windows


def loader_documents(data_dir, split: str, seed: int = 0) -> tuple[list[tuple[int, ...]], np.ndarray, np.ndarray]:
    """With seq_len=1 the windows cover the whole stream: return its documents, tokens and starts."""
    ds = PackedTokenDataset(LoaderConfig(str(data_dir), seq_len=1, micro_batch=1, split=split, seed=seed, loop=False))
    stream, starts = stream_of(take(ds), seq_len=1)
    return split_documents(stream, ds.manifest.eos_id), stream, starts


def test_round_trip_equals_direct_tokenization(data_dir, docs, sp):
    manifest = Manifest.load(data_dir)
    got: Counter = Counter()
    for split in ("train", "val"):
        documents, stream, starts = loader_documents(data_dir, split)
        info = manifest.split(split)
        assert len(stream) == info.tokens + info.documents  # every token and one eos per document
        assert len(documents) == info.documents
        expected_starts = np.concatenate([[True], stream[:-2] == manifest.eos_id])
        np.testing.assert_array_equal(starts, expected_starts)
        got.update(documents)
    assert got == Counter(tuple(sp.encode(d)) for d in docs)


def test_windows_are_overlapping_slices_of_one_stream(data_dir):
    _, stream, starts = loader_documents(data_dir, "train")
    length = 7
    ds = PackedTokenDataset(LoaderConfig(str(data_dir), seq_len=length, micro_batch=3, loop=False))
    tokens, doc_start = windows(take(ds))
    assert len(tokens) == 3 * (((len(stream) - 1) // length) // 3)  # the partial last step is dropped
    for i, (window, flags) in enumerate(zip(tokens, doc_start)):
        np.testing.assert_array_equal(window, stream[i * length:i * length + length + 1])
        np.testing.assert_array_equal(flags, starts[i * length:i * length + length])
    assert tokens.dtype == np.int64


def test_shards_hold_documents_and_hash_split(data_dir, docs, sp):
    manifest = Manifest.load(data_dir)
    assert manifest.dtype == "<u2" and token_dtype(70_000) == np.dtype("<u4")
    direct = {tuple(sp.encode(d)): d for d in docs}
    for split in ("train", "val"):
        info = manifest.split(split)
        assert len(info.shards) > (3 if split == "train" else 0)
        for shard in info.shards:
            data = (data_dir / shard.name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.bytes
            arrays = read_tar_documents(data_dir / shard.name, manifest.dtype)
            assert len(arrays) == shard.documents and sum(map(len, arrays)) == shard.tokens
            for tokens in arrays:
                text = direct[tuple(tokens.tolist())]
                h = int.from_bytes(hashlib.sha256((0).to_bytes(8, "little") + text.encode()).digest()[:8], "little")
                assert (h < 0.05 * 2**64) == (split == "val")


def test_prepare_is_deterministic_across_worker_counts(tmp_path, data_dir, corpus_dir, tokenizer_dir):
    again = prepare(PrepareConfig([str(corpus_dir)], str(tokenizer_dir), str(tmp_path), shard_tokens=600,
                                  workers=2, val_fraction=0.05))
    assert again.splits == Manifest.load(data_dir).splits
    for shard in again.splits["train"].shards:
        assert (tmp_path / shard.name).read_bytes() == (data_dir / shard.name).read_bytes()


def test_loader_is_deterministic_and_seed_dependent(data_dir, tmp_path):
    def run(seed: int, directory=data_dir):
        ds = PackedTokenDataset(LoaderConfig(str(directory), seq_len=16, micro_batch=2, seed=seed, loop=False))
        return windows(take(ds))

    first, second = run(0), run(0)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    copy = shutil.copytree(data_dir, tmp_path / "copy")  # another location, same data
    np.testing.assert_array_equal(run(0, copy)[0], first[0])
    other = run(1)
    assert other[0].shape == first[0].shape and not np.array_equal(other[0], first[0])
    # a different seed reorders documents but keeps the same multiset of documents
    a, b = (Counter(loader_documents(data_dir, "train", seed)[0]) for seed in (0, 1))
    assert a == b
