"""Bridges from megatron-hope's models to other training stacks (optional dependencies)."""
