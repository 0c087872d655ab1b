"""The checkpoint metadata reader unpickles DCP's metadata classes only: a pickle naming anything else is refused
before it is called."""
from __future__ import annotations

import os
import pickle

import pytest
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from checkpoints.errors import CheckpointError
from checkpoints.safe_reader import SafeFileSystemReader


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
