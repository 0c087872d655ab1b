"""Plumbing of `python -m benchmarks.checkpoint` on the tiny preset: every figure printed; nothing timed."""
from __future__ import annotations

from benchmarks import checkpoint


def test_checkpoint_benchmark_smoke(capsys):
    checkpoint.main(["--presets", "tiny"])
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line)
    for key in ("sync_later_total_s", "async_first_blocking_s", "async_later_blocking_s", "async_later_total_s",
                "load_s"):
        assert float(lines[f"tiny_{key}"]) > 0
