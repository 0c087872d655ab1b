"""sentencepiece training: card contents, special ids, byte fallback, streaming of long lines, errors."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import sentencepiece as spm

from data_pipeline.errors import DataPipelineError
from data_pipeline.tokenizer import MAX_LINE_CHARS, Tokenizer, _lines, train_tokenizer
from data_helpers import VOCAB


def test_card_describes_the_model(tokenizer_dir, corpus_dir, sp):
    card = json.loads((tokenizer_dir / "card.json").read_text())
    inputs = b"".join(p.read_bytes() for p in sorted(corpus_dir.iterdir()))
    assert card["vocab_size"] == VOCAB == sp.vocab_size()
    assert card["model_type"] == "bpe" and card["byte_fallback"] is True
    assert (card["unk_id"], card["bos_id"], card["eos_id"], card["pad_id"]) == (
        sp.unk_id(), sp.piece_to_id("<s>"), sp.piece_to_id("</s>"), sp.piece_to_id("<pad>"))
    assert len({card["unk_id"], card["bos_id"], card["eos_id"], card["pad_id"]}) == 4
    assert card["input_sha256"] == hashlib.sha256(inputs).hexdigest()
    assert card["model_sha256"] == hashlib.sha256((tokenizer_dir / "tokenizer.model").read_bytes()).hexdigest()


def test_byte_fallback_round_trips_unseen_text(tokenizer_dir, sp):
    text = "naïve 漢字 ☃ — ok"
    tok = Tokenizer(tokenizer_dir)
    ids = tok.encode(text)
    assert ids == sp.encode(text) and sp.unk_id() not in ids
    assert tok.decode(ids) == text


def test_unigram_and_errors(tmp_path, corpus_dir):
    card = train_tokenizer([corpus_dir], tmp_path / "uni", vocab_size=VOCAB, model_type="unigram", threads=1)
    uni = spm.SentencePieceProcessor(model_file=str(tmp_path / "uni" / "tokenizer.model"))
    assert card.model_type == "unigram" and uni.vocab_size() == VOCAB
    assert uni.decode(uni.encode("tea time")) == "tea time"
    with pytest.raises(DataPipelineError, match="lower --vocab-size"):
        train_tokenizer([corpus_dir], tmp_path / "big", vocab_size=20000, threads=1)
    with pytest.raises(DataPipelineError, match="too small"):
        train_tokenizer([corpus_dir], tmp_path / "small", vocab_size=100)
    with pytest.raises(DataPipelineError, match="no tokenizer in"):
        Tokenizer(tmp_path / "nothing")
    shutil.copytree(tmp_path / "uni", tmp_path / "tampered")
    (tmp_path / "tampered" / "tokenizer.model").write_bytes(b"not the trained model")
    with pytest.raises(DataPipelineError, match="does not match the sha256"):
        Tokenizer(tmp_path / "tampered")


def test_long_lines_are_cut_for_sentencepiece():
    long_line = " ".join(f"w{i}" for i in range(3000))  # ~15k characters, no newline
    pieces = list(_lines(iter([long_line + "\n\n  \nshort"])))
    assert all(0 < len(p) <= MAX_LINE_CHARS for p in pieces)
    assert "".join(pieces[:-1]) == long_line and pieces[-1] == "short"
