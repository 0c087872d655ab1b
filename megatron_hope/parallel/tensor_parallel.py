"""Tensor and sequence parallelism with DTensor, applied to an unmodified HopeLM.

Heads are split whole across the "tp" mesh dim: the mixers' input projections (head-major rows), gates and
per-head scalar projections are column-parallel, their output projections row-parallel, and the per-head
memory states, gate readouts and conv filters are sharded on their head (channel) dim, so the inner loop
needs no communication. CMS levels and Transformer++ MLPs are column/row-parallel, attention splits heads,
the embedding is vocab-parallel and the LM head feeds loss_parallel cross-entropy. With sequence parallelism
the norms and residual adds run on sequence shards (Shard(1)) between the tensor-parallel regions.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from megatron_hope.model.attention import CausalSelfAttention
from megatron_hope.model.layers import SwiGLU
from megatron_hope.model.lm import HopeLM
from megatron_hope.model.titans import SelfModifyingTitans, TitansMixer


def _shard_params(module: nn.Module, names: list[str], mesh: DeviceMesh) -> None:
    """Replace module.<name> (dotted) by a DTensor parameter sharded on dim 0 (the head or channel dim)."""
    for name in names:
        *path, leaf = name.split(".")
        owner = module.get_submodule(".".join(path)) if path else module
        p = getattr(owner, leaf)
        dp = nn.Parameter(distribute_tensor(p.data, mesh, [Shard(0)]), requires_grad=p.requires_grad)
        if isinstance(owner, nn.ParameterDict):
            owner[leaf] = dp
        else:
            setattr(owner, leaf, dp)


def _mlp_plan(prefix: str, sp: bool) -> dict:
    plan = {f"{prefix}.w_gate": ColwiseParallel(), f"{prefix}.w_up": ColwiseParallel(),
            f"{prefix}.w_down": RowwiseParallel(output_layouts=Shard(1) if sp else Replicate(), use_local_output=not sp)}
    if sp:
        plan[prefix] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    return plan


def _mixer_plan(mixer: nn.Module, sp: bool) -> dict:
    seq = Shard(1) if sp else Replicate()
    plan = {
        "": PrepareModuleInput(input_layouts=(seq, None, None), desired_input_layouts=(Replicate(), None, None)),
        "in_proj": ColwiseParallel(),
        "gate": ColwiseParallel(),
        # the norm weight is shared by all heads: its gradient sums over the tp ranks' heads
        "out_norm": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),)),
        "out_proj": RowwiseParallel(output_layouts=seq, use_local_output=not sp),
    }
    for name in ("beta_proj", "gate_proj"):
        if getattr(mixer, name, None) is not None:
            plan[name] = ColwiseParallel()
    return plan


def apply_tensor_parallel(model: HopeLM, mesh: DeviceMesh, sequence_parallel: bool) -> HopeLM:
    """Shard `model` in place over the 1-D tensor-parallel `mesh`; returns it. The caller computes the loss
    under torch.distributed.tensor.parallel.loss_parallel() (the logits stay vocab-sharded)."""
    sp = sequence_parallel
    seq = Shard(1) if sp else Replicate()
    parallelize_module(model, mesh, {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq, use_local_output=not sp),
        "norm": SequenceParallel() if sp else None,
        "head": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False),
    } if sp else {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    })
    if model.cfg.tie_embeddings:  # both are Shard(0) on the vocab dim: one parameter again
        model.head.weight = model.embed.weight
    for block in model.blocks:
        plan: dict = {}
        for name, sub in block.named_children():
            if sp and name.endswith("norm"):
                plan[name] = SequenceParallel()
            if isinstance(sub, (SelfModifyingTitans, TitansMixer)):
                plan.update({f"{name}.{k}" if k else name: v for k, v in _mixer_plan(sub, sp).items()})
            elif isinstance(sub, CausalSelfAttention):
                plan.update({f"{name}.wq": ColwiseParallel(), f"{name}.wk": ColwiseParallel(),
                             f"{name}.wv": ColwiseParallel(),
                             f"{name}.wo": RowwiseParallel(output_layouts=seq, use_local_output=not sp)})
                if sp:
                    plan[name] = PrepareModuleInput(input_layouts=(Shard(1), None),
                                                    desired_input_layouts=(Replicate(), None))
            elif isinstance(sub, SwiGLU):
                plan.update(_mlp_plan(name, sp))
        for lname, level in getattr(getattr(block, "cms", None), "levels", nn.ModuleList()).named_children():
            if sp:
                plan[f"cms.levels.{lname}.norm"] = SequenceParallel()
            plan.update(_mlp_plan(f"cms.levels.{lname}.mlp", sp))
        parallelize_module(block, mesh, plan)
        for name, sub in block.named_children():
            if isinstance(sub, (SelfModifyingTitans, TitansMixer)):
                parallelize_module(sub.out_norm, mesh, PrepareModuleOutput(
                    output_layouts=(Shard(1),), desired_output_layouts=(Shard(1),), use_local_output=True))
                sub.out_norm.weight = nn.Parameter(distribute_tensor(sub.out_norm.weight.data, mesh, [Replicate()]))
                per_head = [f"mem_init.{n}" for n in sub.mem_init] + ["conv.weight"]
                if isinstance(sub, SelfModifyingTitans):
                    per_head += [f"gen_init.{n}" for n in sub.gen_init]
                    per_head += ["eta_readout", "eta_bias", "alpha_readout", "alpha_bias"]
                _shard_params(sub, per_head, mesh)
    return model
