"""Bad input: counted, logged once per kind, skipped where safe, a clear error where not."""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tarfile
from collections import Counter

import numpy as np
import pytest
import webdataset as wds

from data_pipeline.dataset import LoaderConfig, PackedTokenDataset
from data_pipeline.errors import DataPipelineError
from data_pipeline.manifest import Manifest, ShardInfo, SplitInfo
from data_pipeline.prepare import PrepareConfig, prepare
from data_helpers import REPO, read_tar_documents, split_documents, stream_of, take


def documents(data_dir, **kw) -> tuple[Counter, PackedTokenDataset]:
    """Multiset of the complete documents the loader yields (seq_len=1 covers the whole stream)."""
    ds = PackedTokenDataset(LoaderConfig(str(data_dir), seq_len=1, micro_batch=1, loop=False, **kw))
    stream, _ = stream_of(take(ds), 1)
    return Counter(split_documents(stream, ds.manifest.eos_id)), ds


def shard_documents(directory, shards: list[ShardInfo]) -> Counter:
    return Counter(tuple(a.tolist()) for s in shards for a in read_tar_documents(directory / s.name, "<u2"))


@pytest.fixture
def copy(data_dir, tmp_path):
    """A private copy of the prepared data that a test may damage."""
    return shutil.copytree(data_dir, tmp_path / "data")


# --- prepare input -----------------------------------------------------------------------------------------

def test_prepare_counts_and_repairs_bad_text(tmp_path, tokenizer_dir, sp, caplog):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(b"caf\xe9 one\f\f   \ftwo words\n")
    lines = [json.dumps({"text": "three"}).encode(), b"{not json", json.dumps({"body": "x"}).encode(),
             json.dumps({"text": "  "}).encode(), b'{"text": "fo\xffur"}', b""]
    with gzip.open(tmp_path / "in" / "b.jsonl.gz", "wb") as f:
        f.write(b"\n".join(lines))
    with caplog.at_level(logging.WARNING):
        m = prepare(PrepareConfig([str(tmp_path / "in")], str(tokenizer_dir), str(tmp_path / "out"), workers=1,
                                  val_fraction=0.01))
    assert m.issues == {"undecodable_bytes": 2, "empty_document": 3, "bad_json": 1, "missing_text_field": 1}
    logged = Counter(r.getMessage().rsplit("[", 1)[1].split(";")[0] for r in caplog.records)
    assert logged == Counter({kind: 1 for kind in m.issues})  # once per kind
    stored = Counter()
    for split in m.splits.values():
        stored += shard_documents(tmp_path / "out", split.shards)
    expected = ["caf\ufffd one", "two words", "three", "fo\ufffdur"]
    assert stored == Counter(tuple(sp.encode(t)) for t in expected)


def test_prepare_rejects_unusable_input(tmp_path, tokenizer_dir, corpus_dir):
    def run(inputs, out="out", **kw):
        return prepare(PrepareConfig([str(p) for p in inputs], str(tokenizer_dir), str(tmp_path / out), **kw))

    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:-40])
    with pytest.raises(DataPipelineError, match="broken.jsonl.gz.*corrupt or truncated gzip"):
        run([broken])
    with pytest.raises(DataPipelineError, match="does not exist"):
        run([tmp_path / "missing.txt"])
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DataPipelineError, match="notes.md is not one of"):
        run([tmp_path / "notes.md"])
    (tmp_path / "one.txt").write_text("only one document")
    with pytest.raises(DataPipelineError, match="all of them for validation"):
        run([tmp_path / "one.txt"])
    run([corpus_dir], out="again", workers=1)
    with pytest.raises(DataPipelineError, match="--overwrite"):
        run([corpus_dir], out="again")
    with pytest.raises(DataPipelineError, match="--workers"):
        run([corpus_dir], out="x", workers=0)


def test_cli_reports_errors_without_traceback(tmp_path, tokenizer_dir):
    result = subprocess.run([sys.executable, "-m", "data_pipeline.prepare", "--input", str(tmp_path / "nope.txt"),
                             "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "o")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: input") and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


# --- shards ------------------------------------------------------------------------------------------------

def test_missing_shard_is_a_clear_error(copy):
    name = Manifest.load(copy).split("train").shards[3].name
    (copy / name).unlink()
    with pytest.raises(DataPipelineError, match=f"{name} listed in the manifest is missing.*prepare"):
        documents(copy)
    in_workers = PackedTokenDataset(LoaderConfig(str(copy), seq_len=8, micro_batch=2))
    with pytest.raises(DataPipelineError, match=f"^shard .*{name} listed in the manifest is missing") as error:
        take(in_workers.loader(num_workers=2))
    assert "Traceback" not in str(error.value)


def test_checksum_mismatch_raises_or_skips_once_logged(copy, caplog):
    shards = Manifest.load(copy).split("train").shards
    bad = [shards[2], shards[5]]
    for info in bad:  # flip one token byte: same size, different content
        data = bytearray((copy / info.name).read_bytes())
        data[512 + 1] ^= 0xFF
        (copy / info.name).write_bytes(bytes(data))
    with pytest.raises(DataPipelineError, match="does not match its manifest checksum.*skip_corrupt"):
        documents(copy)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        got, ds = documents(copy, skip_corrupt=True)
    assert ds.issues.counts == {"checksum_mismatch": 2}
    assert sum("checksum_mismatch" in r.getMessage() for r in caplog.records) == 1  # logged once per kind
    assert got == shard_documents(copy, [s for s in shards if s not in bad])
    with_workers = PackedTokenDataset(LoaderConfig(str(copy), seq_len=64, micro_batch=4, loop=False,
                                                   skip_corrupt=True))
    take(with_workers.loader(num_workers=2))
    assert with_workers.issues.counts == {"checksum_mismatch": 2}  # counted in the workers, reported here


def test_truncated_and_garbage_tars_use_what_is_readable(copy, caplog):
    shards = Manifest.load(copy).split("train").shards
    truncated, garbage = shards[1], shards[4]
    with tarfile.open(copy / truncated.name) as tar:
        cut = tar.getmembers()[-1].offset_data + 10  # inside the last document's data
    data = (copy / truncated.name).read_bytes()
    (copy / truncated.name).write_bytes(data[:cut])
    (copy / garbage.name).write_bytes(b"\x00garbage" * 200)
    with pytest.raises(DataPipelineError, match="checksum"):
        documents(copy)  # verified by default
    with caplog.at_level(logging.WARNING):
        got, ds = documents(copy, verify_checksums=False)
    readable = read_tar_documents(copy / truncated.name, "<u2")
    assert 0 < len(readable) < truncated.documents
    expected = shard_documents(copy, [s for s in shards if s is not garbage])  # reference reader, same prefix
    assert got == expected
    assert ds.issues["corrupt_tar"] >= 2
    assert ds.issues["missing_documents"] == truncated.documents - len(readable) + garbage.documents
    assert sum("[corrupt_tar;" in r.getMessage() for r in caplog.records) == 1


def test_bad_and_empty_samples_are_skipped(tmp_path):
    good = np.array([5, 6, 7], dtype="<u2")
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as w:
        w.write({"__key__": "0", "tokens": good.tobytes()})
        w.write({"__key__": "1", "tokens": b""})
        w.write({"__key__": "2", "tokens": b"\x01\x02\x03"})  # not a whole number of uint16
        w.write({"__key__": "3", "tokens": good[::-1].tobytes()})
    data = (tmp_path / "train-000000.tar").read_bytes()
    shard = ShardInfo("train-000000.tar", 4, 7, len(data), hashlib.sha256(data).hexdigest())
    Manifest("<u2", 10, 2, 1, 3, "-", 0.5, 0, {"train": SplitInfo([shard])}).save(tmp_path)
    got, ds = documents(tmp_path)
    assert got == Counter([(5, 6, 7), (7, 6, 5)])
    assert ds.issues.counts == {"empty_document": 1, "bad_sample": 1, "missing_documents": 2}


def test_bad_manifest_and_settings_are_clear_errors(tmp_path, data_dir):
    with pytest.raises(DataPipelineError, match="no manifest.*prepare"):
        PackedTokenDataset(LoaderConfig(str(tmp_path), seq_len=8, micro_batch=1))
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(DataPipelineError, match="not a valid manifest"):
        PackedTokenDataset(LoaderConfig(str(tmp_path), seq_len=8, micro_batch=1))
    with pytest.raises(DataPipelineError, match="dp_rank 2 is outside"):
        PackedTokenDataset(LoaderConfig(str(data_dir), seq_len=8, micro_batch=1), dp_rank=2, dp_size=2)
    with pytest.raises(DataPipelineError, match="split 'test'"):
        PackedTokenDataset(LoaderConfig(str(data_dir), seq_len=8, micro_batch=1, split="test"))
    with pytest.raises(DataPipelineError, match="seq_len must be >= 1"):
        PackedTokenDataset(LoaderConfig(str(data_dir), seq_len=0, micro_batch=1))
    too_big = PackedTokenDataset(LoaderConfig(str(data_dir), seq_len=512, micro_batch=8, split="val"))
    with pytest.raises(DataPipelineError, match="cannot fill one global step"):
        next(iter(too_big))
