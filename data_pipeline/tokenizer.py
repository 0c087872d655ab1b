"""Train and load the sentencepiece tokenizer.

    python -m data_pipeline.tokenizer train --input corpus/ --vocab-size 8000 --model-type bpe --out tok/

writes `tok/tokenizer.model` and `tok/card.json` (vocab size, special ids, model type, sha256 of the input).
Training streams the input lines into sentencepiece, which keeps a seeded random sample of at most
`--sample-sentences` lines for large corpora. Byte fallback is on, so any text encodes without <unk>.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from .documents import iter_documents, list_input_files
from .errors import DataPipelineError, run_cli
from .issues import IssueLog

log = logging.getLogger(__name__)

MODEL_FILE = "tokenizer.model"
CARD_FILE = "card.json"
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# 256 byte pieces + the 4 special tokens must fit into the vocabulary.
MIN_VOCAB = 256 + 4 + 1
MAX_LINE_CHARS = 1024


@dataclass(frozen=True)
class TokenizerCard:
    """What a consumer needs to know about a trained tokenizer, stored next to the model."""

    vocab_size: int
    model_type: str
    unk_id: int
    bos_id: int
    eos_id: int
    pad_id: int
    byte_fallback: bool
    input_sha256: str  # over the input files' bytes, in input order
    model_sha256: str
    sentencepiece_version: str

    def save(self, directory: Path) -> None:
        (directory / CARD_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> TokenizerCard:
        path = directory / CARD_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise DataPipelineError(f"{path} is not a valid tokenizer card ({e}); "
                                    "re-run python -m data_pipeline.tokenizer train") from None


class Tokenizer:
    """A trained sentencepiece model plus its card."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.model_path = directory / MODEL_FILE
        if not self.model_path.is_file() or not (directory / CARD_FILE).is_file():
            raise DataPipelineError(f"no tokenizer in {directory} (needs {MODEL_FILE} and {CARD_FILE}); "
                                    "train one with python -m data_pipeline.tokenizer train --out DIR")
        self.card = TokenizerCard.load(directory)
        if _sha256_bytes(self.model_path.read_bytes()) != self.card.model_sha256:
            raise DataPipelineError(f"{self.model_path} does not match the sha256 in its card; "
                                    "re-train the tokenizer or restore the matching model file")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_path))

    @property
    def vocab_size(self) -> int:
        return self.card.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """One thread: parallelism comes from prepare's worker processes (more threads oversubscribe)."""
        return self.sp.encode(texts, num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_files(files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _lines(documents: Iterator[str]) -> Iterator[str]:
    """sentencepiece trains on lines ("sentences") and skips those over 4192 bytes, so long lines are
    cut at whitespace into pieces of at most MAX_LINE_CHARS (<= 4 UTF-8 bytes each); blank lines carry nothing."""
    for doc in documents:
        for line in doc.splitlines():
            while len(line) > MAX_LINE_CHARS:
                cut = line.rfind(" ", 0, MAX_LINE_CHARS) + 1 or MAX_LINE_CHARS
                yield line[:cut]
                line = line[cut:]
            if line.strip():
                yield line


def train_tokenizer(inputs: Sequence[str | Path], out_dir: str | Path, vocab_size: int = 32000,
                    model_type: str = "bpe", text_field: str = "text", sample_sentences: int = 2_000_000,
                    seed: int = 0, threads: int | None = None) -> TokenizerCard:
    """Train a sentencepiece model on the documents of `inputs`; write model + card into `out_dir`."""
    if model_type not in ("bpe", "unigram"):
        raise DataPipelineError(f"model type {model_type!r} is not supported; use bpe or unigram")
    if vocab_size < MIN_VOCAB:
        raise DataPipelineError(f"vocab size {vocab_size} is too small: byte fallback needs 256 byte pieces "
                                f"and 4 special tokens; use --vocab-size >= {MIN_VOCAB}")
    files = list_input_files(inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    issues = IssueLog(log)
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(iter_documents(files, issues, text_field)),
            model_prefix=str(out / Path(MODEL_FILE).stem),
            vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            input_sentence_size=sample_sentences, shuffle_input_sentence=True,
            num_threads=threads or os.cpu_count() or 1, minloglevel=2,
        )
    except RuntimeError as e:
        hint = ("lower --vocab-size or give more text" if "Vocabulary size" in str(e)
                else "check the input text and options")
        raise DataPipelineError(f"sentencepiece training failed: {e}; {hint}") from None
    model_path = out / MODEL_FILE
    card = TokenizerCard(
        vocab_size=vocab_size, model_type=model_type, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        pad_id=PAD_ID, byte_fallback=True, input_sha256=_sha256_files(files),
        model_sha256=_sha256_bytes(model_path.read_bytes()), sentencepiece_version=spm.__version__,
    )
    card.save(out)
    return card


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a sentencepiece model")
    train.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl(.gz) files or directories")
    train.add_argument("--out", required=True, help="output directory")
    train.add_argument("--vocab-size", type=int, default=32000)
    train.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    train.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl input")
    train.add_argument("--sample-sentences", type=int, default=2_000_000,
                       help="train on a seeded random sample of at most this many lines")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=None, help="default: all CPU cores")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    card = train_tokenizer(args.input, args.out, args.vocab_size, args.model_type, args.text_field,
                           args.sample_sentences, args.seed, args.threads)
    print(f"wrote {Path(args.out) / MODEL_FILE} ({card.model_type}, vocab {card.vocab_size}, "
          f"eos {card.eos_id}, input sha256 {card.input_sha256[:12]}...)")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
