"""Read documents from .txt / .jsonl files and their .gz forms.

* `.txt`: the file is split into documents at form-feed characters (`\\f`, the plain-text page break);
  a file without one is a single document.
* `.jsonl`: one JSON object per line; the document is its text field (default "text").

Every document is stripped of surrounding whitespace. Repairs and skips are counted in an `IssueLog`:
undecodable UTF-8 bytes are replaced by U+FFFD ("undecodable_bytes"), whitespace-only documents are
skipped ("empty_document"), as are lines that are not JSON ("bad_json") or lack the text field
("missing_text_field"). A corrupt .gz file is an error: part of the corpus would silently vanish.
"""
from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from .errors import DataPipelineError
from .issues import IssueLog

SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")


def _has_known_suffix(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def list_input_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and directories (searched recursively, sorted) into the input files to read."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _has_known_suffix(p))
            if not found:
                raise DataPipelineError(f"input directory {path} holds no {'/'.join(SUFFIXES)} files; "
                                        "point --input at the text files")
            files.extend(found)
        elif path.is_file():
            if not _has_known_suffix(path):
                raise DataPipelineError(f"input {path} is not one of {', '.join(SUFFIXES)}; "
                                        "convert it or leave it out of --input")
            files.append(path)
        else:
            raise DataPipelineError(f"input {path} does not exist; check the --input path")
    if not files:
        raise DataPipelineError("no input files given; pass --input with text files or directories")
    return files


def _decode(raw: bytes, where: str, issues: IssueLog) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        issues.add("undecodable_bytes", f"{where}: bytes that are not UTF-8 ({e.reason} at byte {e.start}) "
                                        "were replaced by U+FFFD")
        return raw.decode("utf-8", errors="replace")


def _txt_documents(stream: BinaryIO, path: Path, issues: IssueLog) -> Iterator[str]:
    for i, raw in enumerate(stream.read().split(b"\f")):
        text = _decode(raw, f"{path} document {i}", issues).strip()
        if text:
            yield text
        else:
            issues.add("empty_document", f"{path}: document {i} is empty and was skipped")


def _jsonl_documents(stream: BinaryIO, path: Path, text_field: str, issues: IssueLog) -> Iterator[str]:
    for lineno, raw in enumerate(stream, start=1):
        if not raw.strip():
            continue
        line = _decode(raw, f"{path}:{lineno}", issues)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            issues.add("bad_json", f"{path}:{lineno}: not a JSON object ({e.msg}); line skipped")
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            issues.add("missing_text_field", f"{path}:{lineno}: no string field {text_field!r}; line skipped "
                                             "(choose the field with --text-field)")
            continue
        text = text.strip()
        if text:
            yield text
        else:
            issues.add("empty_document", f"{path}:{lineno}: empty document skipped")


def iter_documents(files: Sequence[Path], issues: IssueLog, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of `files` in order."""
    for path in files:
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rb") as stream:
                if path.name.endswith((".jsonl", ".jsonl.gz")):
                    yield from _jsonl_documents(stream, path, text_field, issues)
                else:
                    yield from _txt_documents(stream, path, issues)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DataPipelineError(f"{path} is a corrupt or truncated gzip file ({e}); "
                                    "re-create it or leave it out of --input") from None
