"""torch.compile per block, applied to an unmodified model (model.compile): after tensor parallelism and
activation recomputation, before FSDP2 or the pipeline split, as torchtitan orders them. Each block compiles in
place (Module.compile), so it keeps its class and its parameter and state-dict names; it compiles on its first
call."""
from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile (in place) every entry of `model.blocks` with torch.compile's `backend`."""
    for block in model.blocks:
        block.compile(backend=backend)
    return model
