"""Bundled corpus: the R data reader (hand-built bytes), chapter splitting, and the real Debian package."""
from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
import zlib

import pytest

from data_pipeline.corpus import CorpusUnavailableError, materialise, split_chapters
from data_pipeline.rdata import RDataError, read_lazyload_db
from data_helpers import REPO

HEADER = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"


def ints(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def char(text: str | None, flags: int = 0x00040009, encoding: str = "ascii") -> bytes:
    if text is None:
        return ints(9, -1)
    data = text.encode(encoding)
    return ints(flags, len(data)) + data


def names_attr(names: list[str], first: bool) -> bytes:
    """Pairlist (names = STRSXP); the symbol is written once, then referenced (REFSXP index 1)."""
    symbol = ints(1) + char("names") if first else ints(0x1FF)
    return ints(0x402) + symbol + ints(0x10, len(names)) + b"".join(char(n) for n in names) + ints(0xFE)


def test_lazyload_reader_decodes_hand_built_database(tmp_path):
    book = HEADER + ints(0x10, 4) + char("Title") + char(None) + char("line é", 0x8009, "utf-8") \
        + char("café", 0x4009, "latin-1")
    nums = HEADER + ints(0x0E, 2) + struct.pack(">2d", 1.5, -2.0)
    records, offsets = b"", []
    for raw in (book, nums):
        rec = struct.pack(">I", len(raw)) + zlib.compress(raw)
        offsets.append((len(records), len(rec)))
        records += rec
    index = (HEADER + ints(0x213, 3)
             + ints(0x213, 2) + b"".join(ints(0x0D, 2, o, n) for o, n in offsets) + names_attr(["book", "nums"], True)
             + ints(0x213, 0) + names_attr([], False)
             + ints(0x0A, 1, 1)
             + names_attr(["variables", "references", "compressed"], False))
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    (tmp_path / "Rdata.rdb").write_bytes(records)
    assert read_lazyload_db(tmp_path) == {"book": ["Title", None, "line é", "café"], "nums": [1.5, -2.0]}
    (tmp_path / "Rdata.rdb").write_bytes(records[:20] + b"\x00" * 8 + records[28:])
    with pytest.raises(RDataError, match="record 'book' is corrupt"):
        read_lazyload_db(tmp_path)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(b"RDX2\n" + index))
    with pytest.raises(RDataError, match="not XDR"):
        read_lazyload_db(tmp_path)


def test_split_chapters_joins_paragraphs_and_drops_front_matter():
    lines = ["EMMA", "", "By Someone", "", "VOLUME I", "", "CHAPTER I", "", "It was a", "dark night.", "", "",
             "Second para.", "VOLUME II", "Chapter 2", None, "  The end.  "]
    assert split_chapters(lines) == ["CHAPTER I\n\nIt was a dark night.\n\nSecond para.", "Chapter 2\n\nThe end."]


@pytest.fixture(scope="module")
def austen(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("austen")
    try:
        books = materialise(out, cache)
    except CorpusUnavailableError as e:
        pytest.skip(f"Debian package not obtainable here: {e}")
    return out, cache, books


def test_austen_corpus_materialises(austen):
    out, _, books = austen
    chapters = {b.name: b.chapters for b in books}
    assert chapters == {"emma": 55, "mansfieldpark": 48, "northangerabbey": 31, "persuasion": 24,
                        "prideprejudice": 61, "sensesensibility": 50}
    assert 3.9e6 < sum(b.bytes for b in books) < 4.2e6
    pride = (out / "prideprejudice.txt").read_text().split("\f")
    assert len(pride) == 61
    assert pride[0].startswith("Chapter 1\n\nIt is a truth universally acknowledged, that a single man")
    assert "License: MIT" in (out / "COPYRIGHT").read_text()
    assert json.loads((out / "corpus.json").read_text())["books"][0]["title"] == "EMMA"


def test_corpus_cli_uses_the_cache(austen, tmp_path):
    _, cache, _ = austen
    result = subprocess.run([sys.executable, "-m", "data_pipeline.corpus", "--out", str(tmp_path), "--cache",
                             str(cache)], cwd=REPO, capture_output=True, text=True, env={"PATH": ""})
    assert result.returncode == 0, result.stderr  # PATH is empty: apt-get cannot have run
    assert "wrote 6 books, 269 chapters" in result.stdout
