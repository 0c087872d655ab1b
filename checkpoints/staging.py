"""The async save's staging: a copy of the state in CPU buffers that are allocated on the first save and reused
by every later one.

DCP's default stager allocates a fresh CPU copy of the whole state on every save; on a CPU host that allocation
(page faults over the whole state) costs ~30x the copy itself (benchmarks/checkpoint.py), and it is the time
training is blocked. Reusing the buffers costs one extra copy of the state in host memory for the run's lifetime.
A save must be complete before the next stages into the same buffers (CheckpointManager.save waits for it).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor


class ReusedBufferStager:
    """A torch.distributed.checkpoint AsyncStager (stage -> a training-safe copy) over reused CPU buffers."""

    _synchronize_after_execute = False  # stage() copies synchronously: nothing to wait for afterwards

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, ...], torch.Tensor] = {}

    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return self._copy(state_dict, ())

    def synchronize_staging(self) -> None:
        """Nothing to do: stage() returns after the copy."""

    def close(self) -> None:
        self.buffers.clear()

    def _copy(self, value: Any, path: tuple[str, ...]) -> Any:
        if isinstance(value, dict):
            return {k: self._copy(v, path + (str(k),)) for k, v in value.items()}
        if isinstance(value, DTensor):
            local = self._buffer(path, value.to_local())
            return DTensor.from_local(local, value.device_mesh, value.placements, run_check=False,
                                      shape=value.shape, stride=value.stride())
        if isinstance(value, torch.Tensor):
            return self._buffer(path, value)
        return value

    def _buffer(self, path: tuple[str, ...], tensor: torch.Tensor) -> torch.Tensor:
        buffer = self.buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                                 pin_memory=tensor.is_cuda)
            self.buffers[path] = buffer
        return buffer.copy_(tensor.detach())
