"""Pipeline parallelism with torch.distributed.pipelining over the "pp" mesh dim.

The block stack is cut into pp x vpp chunks balanced by forward FLOPs; chunk s runs on pipeline rank s % pp
(Megatron's interleaving), the first chunk with the embedding, the last with the final norm and head, where the
schedule computes lm_loss against the targets. doc_start goes to every stage as a keyword argument, which the
schedule splits into micro-batches like the inputs. Schedule1F1B runs one chunk per rank, ScheduleInterleaved1F1B
several; both scale gradients by 1/micro-batches (scale_grads), so a step's gradient is that of the mean
micro-batch loss, as in the trainer's accumulation loop. With tied embeddings the first and last stage each hold
the table; their gradients are summed after the schedule, so both copies take the same optimizer steps.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from megatron_hope.config import Config
from megatron_hope.model.lm import HopeLM, lm_loss
from megatron_hope.model.summary import block_forward_flops_per_token, head_forward_flops_per_token
from megatron_hope.parallel.data_parallel import apply_fsdp, mixed_precision


def split_blocks(costs: list[float], n_chunks: int, last_extra: float = 0.0) -> list[range]:
    """Cut blocks with these costs into n_chunks contiguous, non-empty ranges that minimise the costliest chunk,
    the last chunk also paying last_extra (the head). Ties go to the cuts with smaller early chunks."""
    n = len(costs)
    if not 1 <= n_chunks <= n:
        raise ValueError(f"cannot cut {n} blocks into {n_chunks} non-empty chunks")
    prefix = list(accumulate(costs, initial=0.0))
    # best[k][e]: (costliest chunk, chunk starts) for blocks[:e] in k chunks
    best = [[(math.inf, ())] * (n + 1) for _ in range(n_chunks + 1)]
    best[0][0] = (0.0, ())
    for k in range(1, n_chunks + 1):
        extra = last_extra if k == n_chunks else 0.0
        for e in range(k, n - (n_chunks - k) + 1):
            best[k][e] = min((max(best[k - 1][s][0], prefix[e] - prefix[s] + extra), best[k - 1][s][1] + (s,))
                             for s in range(k - 1, e))
    starts = best[n_chunks][n][1]
    return [range(a, b) for a, b in zip(starts, starts[1:] + (n,))]


class ModelChunk(nn.Module):
    """Consecutive blocks of a HopeLM, with the embedding on the first chunk and the final norm + head on the last,
    under the LM's parameter names (embed.*, blocks.<i>.*, norm.*, head.*), so that chunks' state dicts merge into
    the LM's. With tied embeddings the last chunk also keeps the table its head reads."""

    def __init__(self, lm: HopeLM, blocks: range, first: bool, last: bool, act_dtype: torch.dtype):
        super().__init__()
        self.first, self.last, self.act_dtype = first, last, act_dtype
        if first or (last and lm.cfg.tie_embeddings):
            self.embed = lm.embed
        self.blocks = nn.ModuleDict({str(i): lm.blocks[i] for i in blocks})
        if last:
            self.norm, self.head = lm.norm, lm.head

    def forward(self, h: torch.Tensor, doc_start: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (first chunk) or activations (B, T, d) -> activations, or logits (B, T, V) on the last chunk."""
        x = self.embed(h) if self.first else h
        for block in self.blocks.values():
            x, _ = block(x, doc_start)
        # a fixed dtype between stages: the receiving stage's buffers are allocated from static metadata
        return self.head(self.norm(x)) if self.last else x.to(self.act_dtype)


class LocalModel(nn.Module):
    """The chunks this rank holds, under the LM's parameter names: what the optimizer steps and a checkpoint
    saves. It has no forward: the pipeline stages run the chunks."""

    def __init__(self, chunks: list[ModelChunk]):
        super().__init__()
        self.blocks = nn.ModuleDict()
        for chunk in chunks:
            for name, child in chunk.named_children():
                if name == "blocks":
                    self.blocks.update(child)
                else:
                    self.add_module(name, child)


@dataclass
class Pipeline:
    """This rank's stages and their schedule; runs a step's micro-batches and reports losses on every rank."""

    schedule: Schedule1F1B | ScheduleInterleaved1F1B
    stages: list[PipelineStage]
    model: LocalModel
    mesh: DeviceMesh  # ("pp", "dp", "tp")
    device: torch.device
    tied_group: dist.ProcessGroup | None  # this rank's first + last stage peers, when they share the embedding

    @property
    def norm_group(self) -> dist.ProcessGroup:
        """The ranks whose squared gradient norms add up to the global norm (with FSDP's dp reduction)."""
        return self.mesh.get_group("pp")

    @property
    def counted_elsewhere(self) -> list[nn.Parameter]:
        """The last stage's copy of the tied embedding: the first stage counts it in the gradient norm."""
        holds_first = any(stage.is_first for stage in self.stages)
        return [self.model.embed.weight] if self.tied_group is not None and not holds_first else []

    def train_step(self, micro_batches: list[dict]) -> torch.Tensor:
        """Forward and backward of this rank's stages over the step's micro-batches -> mean loss (every rank)."""
        loss = self._run(micro_batches, self.schedule.step)
        self._sum_tied_grads()
        return loss

    @torch.no_grad()
    def evaluate(self, micro_batches: list[dict]) -> torch.Tensor:
        """Mean loss of the micro-batches, forward only; their number is the schedule's."""
        self.model.eval()
        try:
            return self._run(micro_batches, self.schedule.eval)
        finally:
            self.model.train()

    def _run(self, micro_batches: list[dict], run: Callable[..., object]) -> torch.Tensor:
        tokens = torch.cat([b["tokens"] for b in micro_batches]).to(self.device, non_blocking=True)
        doc_start = torch.cat([b["doc_start"] for b in micro_batches]).to(self.device, non_blocking=True)
        first = any(stage.is_first for stage in self.stages)
        last = any(stage.is_last for stage in self.stages)
        losses: list[torch.Tensor] = []
        run(*((tokens[:, :-1].contiguous(),) if first else ()), target=tokens[:, 1:] if last else None, losses=losses,
            return_outputs=False, doc_start=doc_start)
        # the last stage's mean, summed over all ranks, over the ranks that hold a last stage (dp x tp)
        losses = [loss.detach().full_tensor() if isinstance(loss, DTensor) else loss.detach() for loss in losses]
        total = torch.stack(losses).float().mean() if last else torch.zeros((), device=self.device)
        dist.all_reduce(total)
        return total / (dist.get_world_size() // self.mesh["pp"].size())

    @torch.no_grad()
    def _sum_tied_grads(self) -> None:
        if self.tied_group is None:
            return
        weight = self.model.embed.weight
        grad = weight.grad
        if isinstance(grad, DTensor) and grad.placements != weight.placements:
            # tensor parallelism: the embedding's gradient can come back replicated, the head's vocab-sharded;
            # give both ends the parameter's own sharding so that the pair sums matching shards
            grad = weight.grad = grad.redistribute(grad.device_mesh, weight.placements)
        dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=self.tied_group)


def tied_embedding_group(mesh: DeviceMesh) -> dist.ProcessGroup | None:
    """A group per (dp, tp) coordinate of the first and last pipeline rank; this rank's, or None in between.
    Every rank takes part in creating all of them."""
    ranks = mesh.mesh  # (pp, dp, tp) global ranks
    pairs = [[int(ranks[0, d, t]), int(ranks[-1, d, t])] for d in range(ranks.shape[1]) for t in range(ranks.shape[2])]
    group, _ = dist.new_subgroups_by_enumeration(pairs)
    return group


def build_pipeline(lm: HopeLM, cfg: Config, mesh: DeviceMesh, device: torch.device) -> Pipeline:
    """Split `lm` (built alike on every rank) into this rank's stages: FSDP2 over mesh["dp"] when it has several
    ranks or on CUDA (bf16 compute, as apply_fsdp does for the whole model), else moved to `device`."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    pp = p.pipeline_model_parallel_size
    n_stages = pp * p.virtual_pipeline_model_parallel_size
    pp_rank, dp = mesh["pp"].get_local_rank(), mesh["dp"].size()
    ranges = split_blocks([block_forward_flops_per_token(m, t.seq_len)] * m.n_layers, n_stages,
                          head_forward_flops_per_token(m))
    shard = dp > 1 or device.type == "cuda"
    act_dtype = (mixed_precision(device.type).param_dtype if shard else None) or torch.float32
    mb, seq = t.micro_batch_size, t.seq_len
    chunks, stages = [], []
    for s in range(pp_rank, n_stages, pp):
        chunk = ModelChunk(lm, ranges[s], first=s == 0, last=s == n_stages - 1, act_dtype=act_dtype)
        chunk = apply_fsdp(chunk, mesh["dp"], p.reshard_after_forward) if shard else chunk.to(device)
        # static shapes, so the stages skip torch's metadata inference (a real forward and backward)
        act = torch.empty(mb, seq, m.d_model, dtype=act_dtype, device="meta", requires_grad=True)
        inputs = torch.empty(mb, seq, dtype=torch.long, device="meta") if chunk.first else act
        outputs = torch.empty(mb, seq, m.vocab_size, dtype=act_dtype, device="meta") if chunk.last else act
        stages.append(PipelineStage(chunk, s, n_stages, device, input_args=inputs, output_args=outputs,
                                    group=mesh.get_group("pp")))
        chunks.append(chunk)
    n_micro = cfg.grad_accum_steps(dp)
    if len(stages) == 1:
        schedule = Schedule1F1B(stages[0], n_micro, loss_fn=lm_loss)
    else:
        schedule = ScheduleInterleaved1F1B(stages, n_micro, loss_fn=lm_loss)
    tied = tied_embedding_group(mesh) if m.tie_embeddings else None
    return Pipeline(schedule, stages, LocalModel(chunks), mesh, device, tied)
