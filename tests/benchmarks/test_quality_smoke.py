"""Plumbing of `python -m benchmarks.quality`: two steps on a tiny synthetic corpus; nothing timed or compared."""
from __future__ import annotations

import json
import random

from benchmarks import quality


def test_quality_smoke(tmp_path, capsys):
    rng = random.Random(0)
    words = ["".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(1, 8))) for _ in range(200)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 200))) for _ in range(120)]
    (corpus / "docs.txt").write_text("\n\f\n".join(docs) + "\n")
    out = tmp_path / "run"
    quality.main(["--corpus", str(corpus), "--data-dir", str(tmp_path / "data"), "--vocab-size", "320",
                  "--steps", "2", "--batch", "1", "--seq-len", "16", "--eval-batches", "1", "--eval-every", "2",
                  "--warmup", "1", "--threads", "1", "--out", str(out)])
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    for arch in quality.ARCHS:
        assert float(lines[f"val_loss_{arch}"]) > 0
        assert float(lines[f"val_ppl_{arch}"]) > 1
    assert lines["tokens_seen"] == str(2 * 1 * 16)
    assert (out / "loss_curves.png").stat().st_size > 0
    curves = json.loads((out / "metrics.json").read_text())["curves"]
    assert [len(curves[a]["train"]) for a in quality.ARCHS] == [2, 2, 2]
    assert [len(curves[a]["val"]) for a in quality.ARCHS] == [1, 1, 1]
