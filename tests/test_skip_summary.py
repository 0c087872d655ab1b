"""The test command ends with the groups of tests that skipped on this machine, why, and what enables them."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from skip_report import ENABLE, skipped_groups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_groups_count_skips_per_file_with_the_first_reason():
    reports = [SimpleNamespace(nodeid="tests/a.py::x", longrepr=("a.py", 3, "Skipped: needs root")),
               SimpleNamespace(nodeid="tests/a.py::y", longrepr=("a.py", 9, "Skipped: needs root")),
               SimpleNamespace(nodeid="tests/b.py::z[1]", longrepr=("b.py", 1, "Skipped: needs a CUDA device"))]
    assert skipped_groups(reports) == {"tests/a.py": (2, "needs root"), "tests/b.py": (1, "needs a CUDA device")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests run on this machine")
def test_a_run_that_skips_says_so_at_the_end():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ops/test_cuda.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    tail = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(tail) if "skipped test groups" in line)
    line = next(line for line in tail[header:] if line.strip().startswith("tests/ops/test_cuda.py:"))
    assert "skipped (needs a CUDA device); to run them: a machine with a CUDA GPU" in line


def test_every_named_group_exists():
    assert all(os.path.isfile(os.path.join(REPO, path)) for path in ENABLE)
