"""The end of a test run: which test groups skipped on this machine, why, and what enables them."""
from __future__ import annotations

# What enables the tests of a file that skips on a machine without what it needs.
ENABLE = {"tests/training/test_slurm_cluster.py": "bash slurm/ci_cluster.sh install (as root; .ci/run does it)",
          "tests/data/test_data_corpus.py": "apt-get update (the bundled corpus is a Debian package; .ci/run does it)",
          "tests/ops/test_triton_memory_scan.py": "pip install -c constraints.txt triton==3.7.1 (tests/run.sh does it)"}
NEEDS_GPU = "a machine with a CUDA GPU (bash benchmarks/gpu_suite.sh runs the GPU-side checks)"


def skipped_groups(reports) -> dict[str, tuple[int, str]]:
    """{test file: (skipped tests, the first skip reason)} of pytest's skipped reports."""
    groups: dict[str, tuple[int, str]] = {}
    for report in reports:
        path = report.nodeid.split("::")[0]
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        count, first = groups.get(path, (0, reason.removeprefix("Skipped: ")))
        groups[path] = (count + 1, first)
    return groups


def skip_report(reports) -> list[str]:
    """The lines that end a run with skipped tests (none without)."""
    groups = skipped_groups(reports)
    if not groups:
        return []
    lines = ["", "skipped test groups:"]
    for path, (count, reason) in sorted(groups.items()):
        enable = ENABLE.get(path, NEEDS_GPU if "cuda" in reason.lower() or "gpu" in reason.lower() else None)
        lines.append(f"  {path}: {count} skipped ({reason})" + (f"; to run them: {enable}" if enable else ""))
    return lines
