"""Tensor (and sequence) parallelism on 2 gloo ranks against the unsharded model on the same weights and
batch (with a document start mid-sequence): loss, every gradient, and 3 AdamW steps."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("arch", ["hope", "titans", "transformerpp"])
@pytest.mark.parametrize("sp", ["nosp", "sp"])
def test_tensor_parallel_matches_single_process(arch, sp, tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests/parallel/tp_worker.py"), arch, sp, str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for loss, ref in zip(r["losses"], r["ref_losses"]):
        assert abs(loss - ref) <= 1e-5 * abs(ref), (r["losses"], r["ref_losses"])
    assert r["grad_rel_err"] < 1e-4
    assert r["param_err"] < 1e-4
