"""Read R lazy-load databases (`<name>.rdx` index + `<name>.rdb` records) with the standard library.

Only what R packages use for plain data is decoded: XDR serialization (format "X", versions 2 and 3)
of NULL, symbols, pairlists, logical/integer/double/character vectors and lists.
A vector with a "names" attribute becomes a dict; otherwise a list (NA strings become None).
Index: gzip-compressed serialized list with "variables" = name -> (offset, length) into the .rdb.
Record: 4-byte big-endian uncompressed length + zlib stream of one serialized object.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

from .errors import DataPipelineError

NILVALUE, SYM, LIST, CHAR, LGL, INT, REAL, STR, VEC, REF = 254, 1, 2, 9, 10, 13, 14, 16, 19, 255
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10
LATIN1 = 1 << 2  # CHARSXP encoding flag (in the "levels" bits, flags >> 12)


class RDataError(DataPipelineError):
    """The file is not an R serialization this reader understands."""


class _Reader:
    def __init__(self, data: bytes, where: str) -> None:
        self.data, self.pos, self.where = data, 0, where
        self.refs: list[Any] = []  # symbols, referenced later by index

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def bytes(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RDataError(f"{self.where}: serialized data ends early")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def header(self) -> None:
        if self.bytes(2) != b"X\n":
            raise RDataError(f"{self.where}: not XDR-serialized R data (only format 'X' is supported)")
        version = self.int()
        self.int(), self.int()  # writer's R version, minimal reader version
        if version == 3:
            self.bytes(self.int())  # native encoding name
        elif version != 2:
            raise RDataError(f"{self.where}: R serialization version {version} is not supported (2 or 3)")

    def char(self) -> str | None:
        flags, n = self.int(), self.int()
        if flags & 0xFF != CHAR:
            raise RDataError(f"{self.where}: expected a string (CHARSXP), found type {flags & 0xFF}")
        if n == -1:
            return None  # NA_character_
        return self.bytes(n).decode("latin-1" if (flags >> 12) & LATIN1 else "utf-8")

    def attributes(self) -> dict[str, Any]:
        pairs = self.object()
        return pairs if isinstance(pairs, dict) else {}

    def object(self) -> Any:
        flags = self.int()
        kind = flags & 0xFF
        if kind == NILVALUE:
            return None
        if kind == REF:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == SYM:
            name = self.char()
            self.refs.append(name)
            return name
        if kind == LIST:  # pairlist: (attributes) (tag) value rest
            out: dict[str, Any] = {}
            while kind == LIST:
                if flags & HAS_ATTR:
                    self.attributes()
                tag = self.object() if flags & HAS_TAG else str(len(out))
                out[tag] = self.object()
                flags = self.int()
                kind = flags & 0xFF
            if kind != NILVALUE:
                raise RDataError(f"{self.where}: pairlist ends in type {kind}, expected NULL")
            return out
        n = self.int()
        if n < 0:
            raise RDataError(f"{self.where}: long vectors are not supported")
        if kind in (LGL, INT):
            values: list[Any] = [None if v == -2**31 else v for v in struct.unpack_from(f">{n}i", self.bytes(4 * n))]
        elif kind == REAL:
            values = list(struct.unpack_from(f">{n}d", self.bytes(8 * n)))
        elif kind == STR:
            values = [self.char() for _ in range(n)]
        elif kind == VEC:
            values = [self.object() for _ in range(n)]
        else:
            raise RDataError(f"{self.where}: R object type {kind} is not supported by this reader")
        names = self.attributes().get("names") if flags & HAS_ATTR else None
        return dict(zip(names, values)) if names else values


def unserialize(data: bytes, where: str) -> Any:
    reader = _Reader(data, where)
    reader.header()
    return reader.object()


def read_lazyload_db(directory: Path, name: str = "Rdata") -> dict[str, Any]:
    """All objects of the lazy-load database `directory/name.{rdx,rdb}`, by object name."""
    rdx, rdb = directory / f"{name}.rdx", directory / f"{name}.rdb"
    try:
        index = unserialize(gzip.decompress(rdx.read_bytes()), str(rdx))
        records = rdb.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise RDataError(f"cannot read the R database {rdx} / {rdb}: {e}") from None
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise RDataError(f"{rdx} is not a lazy-load index (no 'variables' table)")
    if index.get("compressed") != [1]:
        raise RDataError(f"{rdb} uses compression {index.get('compressed')} (only zlib, 1, is supported)")
    out: dict[str, Any] = {}
    for key, (offset, length) in index["variables"].items():
        record = records[offset:offset + length]
        try:
            data = zlib.decompress(record[4:])
        except zlib.error as e:
            raise RDataError(f"{rdb}: record {key!r} is corrupt ({e})") from None
        if len(data) != struct.unpack_from(">I", record)[0]:
            raise RDataError(f"{rdb}: record {key!r} has the wrong length")
        out[key] = unserialize(data, f"{rdb}[{key}]")
    return out
