"""A DCP FileSystemReader that never unpickles arbitrary objects.

DCP's .metadata file is a pickle; FileSystemReader loads it with pickle.load. This reader unpickles it with an
allow-list of the classes a checkpoint's metadata is made of (DCP's metadata dataclasses, torch.Size, dtypes,
layouts, memory formats, paths); anything else stops the load. Tensor payloads are read by DCP with
torch.load(weights_only=True). Our checkpoints hold no non-tensor (pickled bytes) entries; state_dicts with
them are refused by the loader (checkpoints/state.py), which never asks for such entries."""
from __future__ import annotations

import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, Metadata
from torch.distributed.checkpoint.metadata import StorageMeta

from checkpoints.errors import CheckpointError

_ALLOWED_MODULES = ("torch.distributed.checkpoint.",)
_ALLOWED = {("torch", "Size"), ("torch", "device"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
            ("collections", "OrderedDict")}
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_ALLOWED_MODULES) or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
            return getattr(torch, name)
        raise CheckpointError(f"checkpoint metadata refers to {module}.{name}, which a checkpoint's metadata never "
                              "holds; the file is damaged or not a checkpoint of this project (not loaded)")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError) as e:
                raise CheckpointError(f"{path}: unreadable checkpoint metadata ({e})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
