"""A DCP FileSystemReader that runs nothing a checkpoint's .metadata file names.

DCP's .metadata file is a pickle, which FileSystemReader loads with pickle.load; and a pickle can call any function
it names, with any arguments. This reader never hands the file to pickle: it walks its opcodes
(pickletools.genops) on a small interpreter of its own, which knows the opcodes of plain data and builds nothing
but what DCP metadata is made of: DCP's metadata dataclasses (created empty, then given instance attributes
only), the memory-format enum, torch.Size, dtypes, layouts (looked up by name) and paths (the checkpoint's). Any
other name, opcode or call stops the load before anything runs; nothing it builds runs code of its own. The
Metadata returned is well formed: every field DCP reads has the type DCP expects. Tensor payloads are read by
DCP with torch.load(weights_only=True)."""
from __future__ import annotations

import pickletools
from collections.abc import Callable
from pathlib import PosixPath, PurePosixPath
from types import FunctionType
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint import FileSystemReader, Metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (_MEM_FORMAT_ENCODING, BytesStorageMetadata, ChunkStorageMetadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)

from checkpoints.errors import CheckpointError

# The dataclasses DCP metadata is made of.
_DATACLASSES = frozenset((Metadata, TensorStorageMetadata, BytesStorageMetadata, ChunkStorageMetadata,
                          TensorProperties, StorageMeta, MetadataIndex, _StorageInfo))
_LAYOUTS = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
_DTYPES = {name: v for name, v in vars(torch).items() if isinstance(v, torch.dtype)}


def _layout(name: str) -> torch.layout:
    """What torch pickles a layout as (torch.serialization._get_layout by name): a lookup, nothing else."""
    return _LAYOUTS[name]


def _strings(args: tuple) -> bool:
    return all(isinstance(a, str) for a in args)


# The callables a pickle may call (the REDUCE opcode), each with the check of its arguments.
_CALLS: dict[Any, Callable[[tuple], bool]] = {
    torch.Size: lambda args: len(args) == 1 and isinstance(args[0], (tuple, list))
    and all(type(n) is int for n in args[0]),
    _layout: lambda args: len(args) == 1 and args[0] in _LAYOUTS,
    _MEM_FORMAT_ENCODING: lambda args: len(args) == 1 and type(args[0]) is int,
    PosixPath: _strings,
    PurePosixPath: _strings,
}

# The globals a pickle may name, as pickles spell them (module, qualified name); dtypes are looked up in _DTYPES.
_GLOBALS: dict[tuple[str, str], Any] = {
    **{(cls.__module__, cls.__qualname__): cls for cls in [*_DATACLASSES, _MEM_FORMAT_ENCODING]},
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): _layout,
    **{(module, cls.__name__): cls for module in ("pathlib", "pathlib._local") for cls in (PosixPath, PurePosixPath)},
}


class MetadataError(CheckpointError):
    """A .metadata file this reader does not load; `problem` says why (the message also names the file)."""

    def __init__(self, path: Any, problem: str):
        super().__init__(f"{path}: {problem}")
        self.problem = problem


class _Refused(Exception):
    """The pickle asks for something that DCP metadata never holds."""


class _Malformed(ValueError):
    """The pickle builds something other than well formed DCP metadata."""


def _plain_name(key: Any) -> bool:
    return isinstance(key, str) and key.isidentifier() and not key.startswith("__")


def _describe(value: Any) -> str:
    if isinstance(value, (type, FunctionType)):
        return f"{value.__module__}.{value.__qualname__}"
    text = repr(value) if isinstance(value, (str, int, float, tuple, list, dict)) else f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


class _Interpreter:
    """The pickle virtual machine for the opcodes DCP metadata uses (op_<NAME> handles opcode NAME)."""

    def __init__(self) -> None:
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}

    def run(self, stream: BinaryIO) -> Any:
        for op, arg, _ in pickletools.genops(stream):
            handler = _HANDLERS.get(op.name)
            if handler is None:
                raise _Refused(f"uses the pickle opcode {op.name}")
            handler(self, arg)
        if len(self.stack) != 1 or self.marks:
            raise _Malformed("the pickle does not end with one object")
        return self.stack[0]

    def _pop_mark(self) -> list[Any]:
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def _top(self, kind: type) -> Any:
        if not isinstance(self.stack[-1], kind):
            raise _Malformed(f"an opcode for a {kind.__name__} meets {_describe(self.stack[-1])}")
        return self.stack[-1]

    def _push(self, value: Any) -> None:
        self.stack.append(value)

    # framing and structure
    def op_PROTO(self, _: Any) -> None:
        pass

    op_FRAME = op_STOP = op_PROTO

    def op_MARK(self, _: Any) -> None:
        self.marks.append(len(self.stack))

    def op_POP(self, _: Any) -> None:
        self.stack.pop()

    def op_POP_MARK(self, _: Any) -> None:
        self._pop_mark()

    def op_MEMOIZE(self, index: int | None) -> None:
        self.memo[len(self.memo) if index is None else index] = self.stack[-1]

    op_BINPUT = op_LONG_BINPUT = op_MEMOIZE

    def op_BINGET(self, index: int) -> None:
        self._push(self.memo[index])

    op_LONG_BINGET = op_BINGET

    # plain values (genops has decoded them)
    def op_BININT(self, value: Any) -> None:
        self._push(value)

    op_BININT1 = op_BININT2 = op_LONG1 = op_LONG4 = op_BINFLOAT = op_BININT
    op_SHORT_BINUNICODE = op_BINUNICODE = op_BINUNICODE8 = op_SHORT_BINBYTES = op_BINBYTES = op_BINBYTES8 = op_BININT

    def op_NONE(self, _: Any) -> None:
        self._push(None)

    def op_NEWTRUE(self, _: Any) -> None:
        self._push(True)

    def op_NEWFALSE(self, _: Any) -> None:
        self._push(False)

    # containers
    def op_EMPTY_LIST(self, _: Any) -> None:
        self._push([])

    def op_EMPTY_DICT(self, _: Any) -> None:
        self._push({})

    def op_EMPTY_TUPLE(self, _: Any) -> None:
        self._push(())

    def op_EMPTY_SET(self, _: Any) -> None:
        self._push(set())

    def _tuple_of(self, n: int) -> None:
        if len(self.stack) < n:
            raise _Malformed("the stack holds too few items")
        items = tuple(self.stack[len(self.stack) - n:])
        del self.stack[len(self.stack) - n:]
        self._push(items)

    def op_TUPLE1(self, _: Any) -> None:
        self._tuple_of(1)

    def op_TUPLE2(self, _: Any) -> None:
        self._tuple_of(2)

    def op_TUPLE3(self, _: Any) -> None:
        self._tuple_of(3)

    def op_TUPLE(self, _: Any) -> None:
        self._push(tuple(self._pop_mark()))

    def op_LIST(self, _: Any) -> None:
        self._push(self._pop_mark())

    def op_FROZENSET(self, _: Any) -> None:
        self._push(frozenset(self._pop_mark()))

    def op_APPEND(self, _: Any) -> None:
        value = self.stack.pop()
        self._top(list).append(value)

    def op_APPENDS(self, _: Any) -> None:
        items = self._pop_mark()
        self._top(list).extend(items)

    def op_ADDITEMS(self, _: Any) -> None:
        items = self._pop_mark()
        self._top(set).update(items)

    def op_SETITEM(self, _: Any) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._top(dict)[key] = value

    def op_SETITEMS(self, _: Any) -> None:
        items = self._pop_mark()
        target = self._top(dict)
        for key, value in zip(items[::2], items[1::2], strict=True):
            target[key] = value

    # objects: only DCP metadata's
    def op_STACK_GLOBAL(self, _: Any) -> None:
        name = self.stack.pop()
        module = self.stack.pop()
        self._global(module, name)

    def op_GLOBAL(self, module_and_name: str) -> None:
        self._global(*module_and_name.split(" ", 1))

    def _global(self, module: Any, name: Any) -> None:
        if not (isinstance(module, str) and isinstance(name, str)):
            raise _Malformed("a global's module and name are not strings")
        if module == "torch" and name in _DTYPES:
            self._push(_DTYPES[name])
        elif (module, name) in _GLOBALS:
            self._push(_GLOBALS[(module, name)])
        else:
            raise _Refused(f"refers to {module}.{name}")

    def op_REDUCE(self, _: Any) -> None:
        args = self.stack.pop()
        func = self.stack.pop()
        check = _CALLS.get(func) if isinstance(func, (type, FunctionType)) else None
        if check is None or not isinstance(args, tuple) or not check(args):
            raise _Refused(f"calls {_describe(func)} with {_describe(args)}")
        self._push(func(*args))

    def op_NEWOBJ(self, _: Any) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if not (isinstance(cls, type) and cls in _DATACLASSES) or args != ():
            raise _Refused(f"creates {_describe(cls)} from {_describe(args)}")
        self._push(cls.__new__(cls))

    def op_BUILD(self, _: Any) -> None:
        state = self.stack.pop()
        obj = self.stack[-1]
        if type(obj) in _DATACLASSES and isinstance(state, dict) and all(_plain_name(k) for k in state):
            vars(obj).update(state)  # instance attributes only (a field another torch version adds is kept)
        elif type(obj) is TensorProperties and isinstance(state, tuple):
            obj.__setstate__(state)  # its own: dtype, layout, flags and the memory format's enum member
        else:
            raise _Refused(f"sets {_describe(state)} on {_describe(obj)}")


_HANDLERS = {name.removeprefix("op_"): f for name, f in vars(_Interpreter).items() if name.startswith("op_")}


def _expect(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, kind):
        raise _Malformed(f"{what} is {_describe(value)}")
    return value


def _check_tensor(fqn: str, entry: TensorStorageMetadata) -> None:
    properties = _expect(getattr(entry, "properties", None), TensorProperties, f"{fqn}'s properties")
    _expect(getattr(properties, "dtype", None), torch.dtype, f"{fqn}'s dtype")
    size = _expect(getattr(entry, "size", None), torch.Size, f"{fqn}'s size")
    for chunk in _expect(getattr(entry, "chunks", None), list, f"{fqn}'s chunks"):
        _expect(chunk, ChunkStorageMetadata, f"a chunk of {fqn}")
        for field in ("offsets", "sizes"):
            if len(_expect(getattr(chunk, field, None), torch.Size, f"a chunk's {field} of {fqn}")) != len(size):
                raise _Malformed(f"a chunk of {fqn} has {field} of another rank than the tensor")


def _check_storage_item(index: Any, info: Any) -> None:
    _expect(index, MetadataIndex, "a storage item's index")
    fqn = _expect(getattr(index, "fqn", None), str, "a storage item's name")
    _expect(getattr(index, "offset", None), (torch.Size, type(None)), f"{fqn}'s storage offset")
    _expect(info, _StorageInfo, f"{fqn}'s storage item")
    _expect(getattr(info, "relative_path", None), str, f"{fqn}'s file")
    for field in ("offset", "length"):
        if type(getattr(info, field, None)) is not int or getattr(info, field) < 0:
            raise _Malformed(f"{fqn}'s storage {field} is {_describe(getattr(info, field, None))}")


def _check_metadata(metadata: Any) -> Metadata:
    """`metadata` if it is well formed DCP metadata, else _Malformed naming the first flaw."""
    if not isinstance(metadata, Metadata):
        raise _Malformed(f"it holds a {type(metadata).__name__}, not checkpoint metadata")
    entries = _expect(getattr(metadata, "state_dict_metadata", None), dict, "state_dict_metadata")
    for fqn, entry in entries.items():
        _expect(fqn, str, "an entry's name")
        if not isinstance(_expect(entry, (TensorStorageMetadata, BytesStorageMetadata), fqn), BytesStorageMetadata):
            _check_tensor(fqn, entry)
    for index, info in _expect(getattr(metadata, "storage_data", None), dict, "storage_data").items():
        _check_storage_item(index, info)
    _expect(getattr(metadata, "storage_meta", None), (StorageMeta, type(None)), "storage_meta")
    return metadata


def load_metadata(stream: BinaryIO, path: Any) -> Metadata:
    """The DCP Metadata pickled in `stream` (the file `path`), built without running anything it names;
    MetadataError if the pickle asks for anything else or is not well formed DCP metadata."""
    try:
        return _check_metadata(_Interpreter().run(stream))
    except _Refused as e:
        raise MetadataError(path, f"the pickle {e}, which DCP metadata never does; not loaded: the file is damaged "
                                  "or crafted (use a trusted copy of the checkpoint)") from None
    except _Malformed as e:
        raise MetadataError(path, f"not DCP metadata: {e}; the file is damaged (use an intact copy of the "
                                  "checkpoint)") from None
    except Exception as e:  # noqa: BLE001 - whatever a malformed pickle provokes in the interpreter or the checks
        raise MetadataError(path, f"unreadable checkpoint metadata ({type(e).__name__}: {e}); the file is damaged "
                                  "(use an intact copy of the checkpoint)") from None


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = load_metadata(f, path)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
