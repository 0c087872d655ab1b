"""Plumbing of `python -m benchmarks.mixer` at a tiny shape, and its two counters on known functions; nothing
timed or compared."""
from __future__ import annotations

import torch
from torch import nn

from benchmarks import mixer


def test_op_counter_counts_every_op():
    with mixer.OpCounter() as counter:
        torch.ones(2).add(1).mul(2)
    assert counter.counts == {"ones.default": 1, "add.Tensor": 1, "mul.Tensor": 1}


def test_retained_bytes_counts_what_backward_keeps():
    x = torch.randn(2, 3, requires_grad=True)

    class ExpSin(nn.Module):
        def forward(self, x):
            return x.exp().sin()  # sin keeps its input, exp's fp32 output; exp keeps the output sin consumed

    assert mixer.retained_bytes(ExpSin(), x) == 2 * 3 * 4
    assert mixer.retained_bytes(nn.Sigmoid(), x) == 0  # sigmoid keeps its output, which is not counted
    assert mixer.retained_bytes(nn.Identity(), x) == 0


def test_mixer_smoke(capsys):
    mixer.main(["--d-model", "32", "--heads", "2", "--chunk", "8", "--batch", "1", "--seq-lens", "16", "32",
                "--act-seq-len", "32", "--reps", "1", "--threads", "1"])
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["compiled"] == "false"
    numbers = [f"{key}_ops_per_chunk_t{T}" for key in ("mixer", "titans_mixer") for T in (16, 32)]
    numbers += [f"{name}_{what}" for name in mixer.LAYERS for what in ("retained_bytes_per_token", "peak_bytes_per_token", "fwd_bwd_tokens_per_s")]
    numbers += ["hope_vs_transformerpp_activation_ratio", "hope_vs_transformerpp_peak_ratio", "hope_vs_transformerpp_mixer_tokens_per_s_ratio"]
    for key in numbers:
        assert float(lines[key]) > 0, key
    top = dict(item.split("=") for item in lines["hope_top_ops"].split(", "))
    assert len(top) == 10 and all(float(n) > 0 for n in top.values())
