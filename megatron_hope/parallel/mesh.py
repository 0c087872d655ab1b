"""The run's DeviceMesh: dims ("pp", "dp", "tp") in Megatron's rank order (tp fastest, then dp, then pp), so that
tensor-parallel peers are neighbouring ranks (one node) and pipeline stages are furthest apart. All three dims
are always present (size 1 when unused); plans take their 1-D submesh, e.g. mesh["dp"] for FSDP2."""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron_hope.config import ParallelConfig

MESH_DIMS = ("pp", "dp", "tp")


def mesh_shape(parallel: ParallelConfig, world_size: int) -> tuple[int, int, int]:
    """(pp, dp, tp) sizes; dp is what the world size leaves after tensor x pipeline parallelism."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not a multiple of tensor x pipeline parallel size {tp * pp}")
    return pp, world_size // (tp * pp), tp


def init_mesh(parallel: ParallelConfig, rank: int, world_size: int, device: torch.device,
              timeout_s: float = 600) -> DeviceMesh:
    """Start the default process group (gloo on CPU, nccl on CUDA; collectives fail after `timeout_s`) and
    return the 3-D mesh over it.

    The rendezvous comes from the environment (MASTER_ADDR/PORT, set by the launcher or launch.env); a lone
    process without one gets an in-memory store."""
    shape = mesh_shape(parallel, world_size)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    store = dist.HashStore() if world_size == 1 and not dist.is_torchelastic_launched() else None
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world_size,
                            device_id=device if cuda else None, timeout=timedelta(seconds=timeout_s))
    return init_device_mesh(device.type, shape, mesh_dim_names=MESH_DIMS)
