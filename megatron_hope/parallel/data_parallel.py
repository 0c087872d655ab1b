"""Data parallelism with FSDP2: a 1-D DeviceMesh named "dp", fully_shard on every block and on the root.

Parameters stay fp32 on CPU; on CUDA they are gathered in bf16 and gradients reduced in fp32
(MixedPrecisionPolicy), while the sharded fp32 parameters are what the optimizer updates.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def init_dp_mesh(rank: int, world_size: int, device: torch.device) -> DeviceMesh:
    """Start the default process group (gloo on CPU, nccl on CUDA) and return the 1-D "dp" mesh over it.

    Under torchrun the rendezvous comes from the environment (MASTER_ADDR/PORT); a lone process without
    one gets an in-memory store."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    store = dist.HashStore() if world_size == 1 and not dist.is_torchelastic_launched() else None
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world_size,
                            device_id=device if cuda else None)
    return init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool) -> nn.Module:
    """Shard `model` in place: one FSDP unit per entry of `model.blocks`, the rest (embedding, final norm,
    head) in the root unit. Parameters move to the mesh's device."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `blocks` ModuleList to shard per block")
    if mesh.device_type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()  # fp32 throughout: CPUs here have no fast bf16
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    return model
