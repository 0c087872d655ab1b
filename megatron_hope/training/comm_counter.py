"""Bytes sent by the actual collectives, attributed to the mesh dim whose process group carried them.

A TorchDispatchMode sees every c10d op (what torch.distributed, FSDP2 and the pipeline schedules call) and
every functional collective (what DTensor redistributions call), with the process group or its name among the
arguments; the payload counted is the op's first tensor argument (for point-to-point ops, the tensor sent or
received; for FSDP2's reduce-scatter, this rank's shard of the reduced gradient).

Per parameter group: count_fsdp_units() gives each FSDP2 sharding unit a reduce-scatter of its own
(FSDPModule.set_custom_reduce_scatter) that does the same collective and adds its shard bytes to `by_group`, under
"cms_level<l>" for a CMS level's own unit (schedule-aware accumulation) and "period1" for every other unit.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


def _nbytes(x: object) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(y) for y in x)
    return 0


def _group_name(arg: object) -> str | None:
    """c10d ops carry their process group as a TorchScript object (beside others, e.g. the reduce op)."""
    if isinstance(arg, torch.ScriptObject):
        try:
            return dist.ProcessGroup.unbox(arg).group_name
        except RuntimeError:  # not a process group
            return None
    return None


class CommCounter(TorchDispatchMode):
    """Counts bytes per mesh dim name ("dp", "tp", "pp", or `other` for any other group) while active."""

    def __init__(self, mesh: DeviceMesh | None, other: str = "other"):
        super().__init__()
        self.other = other
        self.names: dict[str, str] = {}
        if mesh is not None:
            for dim in mesh.mesh_dim_names or ():
                if mesh[dim].size() > 1:
                    self.names[mesh.get_group(dim).group_name] = dim
        self.bytes: dict[str, int] = defaultdict(int)
        self.reduced: dict[str, int] = defaultdict(int)  # the part of `bytes` sent by reductions (reduce-scatter,
        # all-reduce): gradient synchronization
        self.by_group: dict[str, int] = defaultdict(int)  # FSDP2 gradient reduce-scatter bytes per parameter group

    def count_fsdp_units(self, model: nn.Module) -> None:
        """Count the gradient reduce-scatters of `model`'s FSDP2 units per parameter group (see the module doc)."""
        from torch.distributed.fsdp import FSDPModule

        from megatron_hope.model.cms import cms_level_of
        for name, module in model.named_modules():
            if isinstance(module, FSDPModule):
                level = cms_level_of(name + ".x") if name.split(".")[-2:-1] == ["levels"] else None
                module.set_custom_reduce_scatter(_CountedReduceScatter(self, "period1" if level is None
                                                                       else f"cms_level{level}"))

    def _dim(self, args: tuple) -> str:
        for a in args:
            name = a if isinstance(a, str) else _group_name(a)
            if name in self.names:
                return self.names[name]
        return self.other

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional") and "wait" not in func.__name__ \
                and "wrap_tensor" not in func.__name__:
            dim, n = self._dim(args), _nbytes(args[0])
            self.bytes[dim] += n
            if "reduce" in func.__name__:
                self.reduced[dim] += n
        return func(*args, **(kwargs or {}))



class _CountedReduceScatter:
    """FSDP2's reduce-scatter for one sharding unit (the FSDP2 ReduceScatter comm interface: allocate the
    buffers, run the collective), counting this rank's shard bytes under `label`."""

    def __init__(self, counter: CommCounter, label: str):
        self.counter, self.label = counter, label

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup, op,
                 async_op: bool = False):
        self.counter.by_group[self.label] += _nbytes(output_tensor)
        return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
