"""Fused Triton kernels behind the ops' signatures (one file per kernel family), selected by model.memory.impl.

Triton is optional: `available()` says whether it imports and `unsupported()` which options a kernel lacks,
without importing it; nothing above ops/ imports the kernel modules.
On a machine without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before the first
import of a kernel module), which is how the tests check them on CPU.
"""
from __future__ import annotations

import functools
import importlib.util


@functools.cache  # asked on every mixer call; the installation does not change during a run
def available() -> bool:
    """Whether triton can be imported (the kernels' only extra dependency)."""
    return importlib.util.find_spec("triton") is not None


def unsupported(opts) -> str | None:
    """Why the memory-scan kernels cannot run a scan with these ops.memory.MemoryOptions, or None when they can."""
    if not opts.differentiable:
        return "stop-grad writes (model.memory.differentiable_writes = false)"
    return None


def fold_rows(grad, rep: int):
    """The gradient of an input row shared by `rep` consecutive kernel rows (a stack of memories reading the same
    keys and gates): the sum over those rows."""
    return grad if rep == 1 else grad.view(-1, rep, *grad.shape[1:]).sum(1)
