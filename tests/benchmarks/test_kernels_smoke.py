"""Plumbing of `python -m benchmarks.kernels` at a tiny shape (the kernels under Triton's interpreter on a CPU):
the kernel path's op count does not grow with the sequence, and the launch counter sees the two kernels."""
from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed")

from benchmarks import kernels  # noqa: E402


def test_kernels_smoke(capsys):
    kernels.main(["--device", "cpu", "--op-seq-lens", "32", "64", "--op-d-model", "16", "--chunk", "16"])
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    for kind in kernels.KINDS:
        key = f"titans_{kind}_mixer"
        assert lines[f"{key}_triton_kernel_launches_t32"] == "2"  # one forward, one backward
        assert lines[f"{key}_triton_ops_per_layer_t32"] == lines[f"{key}_triton_ops_per_layer_t64"]
        assert int(lines[f"{key}_torch_ops_per_layer_t64"]) > int(lines[f"{key}_torch_ops_per_layer_t32"])
        assert float(lines[f"{kind}_kernel_vs_oracle_max_rel_error_fp64"]) < 1e-12
        assert float(lines[f"{kind}_kernel_vs_oracle_max_rel_error_fp32"]) < 1e-5
    # HOPE: per chunk the generator reads and the writes, one launch each way each
    assert float(lines["hope_mixer_triton_kernel_launches_per_chunk_t64"]) == 4
    assert float(lines["hope_mixer_triton_ops_per_chunk_t64"]) < float(lines["hope_mixer_torch_ops_per_chunk_t64"])
