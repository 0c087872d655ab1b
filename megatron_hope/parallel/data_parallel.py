"""Data parallelism with FSDP2 over the "dp" dim of the run's mesh (parallel/mesh.py): fully_shard on every block
and on the root.

Parameters stay fp32 on CPU; on CUDA they are gathered in bf16 and gradients reduced in fp32
(MixedPrecisionPolicy), while the sharded fp32 parameters are what the optimizer updates.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def mixed_precision(device_type: str) -> MixedPrecisionPolicy:
    """bf16 parameters in compute and fp32 gradient reduction on CUDA; fp32 throughout on CPU (no fast bf16)."""
    if device_type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool,
               periods: list[int] | None = None) -> nn.Module:
    """Shard `model` in place: one FSDP unit per entry of `model.blocks` (a ModuleList, or a ModuleDict as in a
    pipeline chunk), the rest (embedding, final norm, head) in the root unit. Parameters move to the mesh's
    device.

    periods: the CMS levels' outer periods K_l; each level with K_l > 1 becomes a unit of its own in every block
    (block.cms.levels[l]), whose gradient sync the trainer switches per step (training/loop.py). Such a unit keeps
    its gathered parameters from forward to backward (reshard_after_forward=False), and between steps while its
    sync is off, so a level is gathered and reduced once per period."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.ModuleDict)):
        raise TypeError(f"{type(model).__name__} has no `blocks` ModuleList or ModuleDict to shard per block")
    policy = mixed_precision(mesh.device_type)
    for block in blocks.children():
        for level, period in enumerate(periods or []):
            if period > 1:
                fully_shard(block.cms.levels[level], mesh=mesh, reshard_after_forward=False, mp_policy=policy)
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    return model


def _fsdp_params(unit: nn.Module) -> list[tuple[str, object]]:
    """(name relative to `unit`, FSDPParam) of an FSDP2 unit's own parameters. FSDPParam is FSDP2's internal
    per-parameter record (torch.distributed.fsdp._fully_shard), the only place its accumulated gradients live."""
    names = {module: name for name, module in unit.named_modules()}
    group = unit._get_fsdp_state()._fsdp_param_group
    params = group.fsdp_params if group is not None else []
    return [(".".join(filter(None, (names[fp._module_info.module], fp._module_info.param_name))), fp) for fp in params]


def accumulated_gradients(unit: nn.Module) -> dict[str, torch.Tensor]:
    """The local gradients an FSDP2 unit has accumulated while its gradient sync was off, unsharded, by
    parameter name: in the reduce dtype (fp32) under mixed precision, where FSDP2 keeps them beside the
    parameter; on the gathered parameter's .grad otherwise."""
    unit.unshard()  # a no-op while gathered (sync off keeps it so); after a reshard, gathers the same values
    found = {}
    for name, fp in _fsdp_params(unit):
        grad = fp.unsharded_accumulated_grad
        if grad is None:
            grad = fp.unsharded_param.grad
        if grad is not None:
            found[name] = grad.detach()
    return found


def set_accumulated_gradients(unit: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    """Put accumulated_gradients() back into an FSDP2 unit (e.g. from a checkpoint), before its next backward."""
    unit.unshard()
    params = dict(_fsdp_params(unit))
    unknown = sorted(set(grads) - set(params))
    if unknown:
        raise KeyError(f"no parameters {unknown} in this FSDP2 unit")
    with torch.no_grad():
        for name, grad in grads.items():
            fp = params[name]
            target = fp.unsharded_param
            if tuple(grad.shape) != tuple(target.shape):
                raise ValueError(f"{name}: accumulated gradient of shape {tuple(grad.shape)}, parameter "
                                 f"{tuple(target.shape)}")
            if fp.param_dtype is not None and fp.param_dtype != fp.reduce_dtype:  # mixed precision
                fp.unsharded_accumulated_grad = grad.to(device=target.device, dtype=fp.reduce_dtype).clone()
            else:
                target.grad = grad.to(device=target.device, dtype=target.dtype).clone()
