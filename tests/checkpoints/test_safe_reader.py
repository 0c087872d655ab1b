"""The checkpoint metadata reader builds DCP's metadata and nothing else: a pickle naming, calling or changing
anything else is refused before anything runs; real metadata comes out as pickle would build it."""
from __future__ import annotations

import io
import os
import pickle

import pytest
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata

from checkpoint_helpers import call_opcodes, global_opcodes, metadata, text_opcodes
from checkpoints.errors import CheckpointError
from checkpoints.safe_reader import SafeFileSystemReader, load_metadata

DCP_METADATA = "torch.distributed.checkpoint.metadata"


class _Exploit:
    def __reduce__(self):
        return os.system, ("echo pwned > exploited",)


def test_a_real_checkpoints_metadata_is_read(run):
    metadata = SafeFileSystemReader(str(run.newest)).read_metadata()
    model = {k.removeprefix("model."): m for k, m in metadata.state_dict_metadata.items() if k.startswith("model.")}
    assert model.keys() == run.params.keys()
    for name, meta in model.items():
        assert isinstance(meta, TensorStorageMetadata)
        assert (tuple(meta.size), meta.properties.dtype) == (tuple(run.params[name].shape), run.params[name].dtype)


def test_a_forbidden_global_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps(_Exploit())
    assert b"system" in payload
    (tmp_path / ".metadata").write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"refers to (posix|os)\.system"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()
    assert not (tmp_path / "exploited").exists()


def test_a_pickle_of_something_else_is_refused(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(CheckpointError, match="holds a dict, not checkpoint metadata"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_real_metadata_comes_out_as_pickle_builds_it(run, protocol):
    expected = metadata(run.newest)
    got = load_metadata(io.BytesIO(pickle.dumps(expected, protocol=protocol)), "test")
    assert got == expected and got.storage_data == expected.storage_data


def refused(opcodes: bytes) -> str:
    with pytest.raises(CheckpointError) as e:
        load_metadata(io.BytesIO(pickle.PROTO + bytes([4]) + opcodes + pickle.STOP), "test")
    return str(e.value)


def test_an_allowed_class_is_not_called_with_arguments():
    """REDUCE builds torch.Size, layouts, enum members and paths only; DCP's dataclasses come from NEWOBJ."""
    assert "the pickle calls torch.distributed.checkpoint.metadata.StorageMeta with ('x',)" in \
        refused(call_opcodes(DCP_METADATA, "StorageMeta", "x"))


def test_a_class_is_never_changed():
    """BUILD sets fields of the metadata's objects, never attributes of a class."""
    state = pickle.NONE + pickle.EMPTY_DICT + text_opcodes("save_id") + text_opcodes("changed") + pickle.SETITEM + \
        pickle.TUPLE2  # (no __dict__ state, {attribute: value} set with setattr)
    problem = refused(global_opcodes(DCP_METADATA, "StorageMeta") + state + pickle.BUILD)
    assert f"the pickle sets (None, {{'save_id': 'changed'}}) on {DCP_METADATA}.StorageMeta" in problem
    assert StorageMeta.save_id is None
