"""Activation recomputation, applied to an unmodified model: "selective" recomputes the token mixers (the
memory inner loop, whose saved activations dominate, hope_spec.md 2.6) in backward, "full" recomputes
whole blocks; "none" stores everything."""
from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper


def apply_recompute(model: nn.Module, granularity: str) -> nn.Module:
    """Wrap (in place) the blocks, or the blocks' `mixer`/`attn` submodules, in non-reentrant checkpointing."""
    if granularity == "none":
        return model
    for i, block in enumerate(model.blocks):
        if granularity == "full":
            model.blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            continue
        for name in ("mixer", "attn"):
            if hasattr(block, name):
                setattr(block, name, checkpoint_wrapper(getattr(block, name),
                                                        checkpoint_impl=CheckpointImpl.NO_REENTRANT))
    return model
