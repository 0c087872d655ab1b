"""Plumbing of `python -m benchmarks.kernels` at a tiny shape (the kernels under Triton's interpreter on a CPU):
the kernel path's op count does not grow with the sequence, and the launch counter sees the two kernels."""
from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed")

from benchmarks import kernels  # noqa: E402


def test_kernels_smoke(capsys):
    kernels.main(["--device", "cpu", "--op-seq-lens", "32", "64", "--op-d-model", "16", "--chunk", "16"])
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["titans_linear_mixer_triton_kernel_launches_t32"] == "2"  # one forward, one backward
    assert lines["titans_linear_mixer_triton_ops_per_layer_t32"] == lines["titans_linear_mixer_triton_ops_per_layer_t64"]
    assert int(lines["titans_linear_mixer_torch_ops_per_layer_t64"]) > int(lines["titans_linear_mixer_torch_ops_per_layer_t32"])
    assert float(lines["kernel_vs_oracle_max_rel_error_fp64"]) < 1e-12
    assert float(lines["kernel_vs_oracle_max_rel_error_fp32"]) < 1e-5
