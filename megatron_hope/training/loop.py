"""The training loop: micro-batch accumulation, loss, backward, global grad-norm clipping, optimizer and LR
steps, non-finite loss handling, periodic evaluation and metrics.

A step consumes grad_accum micro-batches per rank; each micro-batch's mean loss is scaled by 1/grad_accum before
backward, and the data-parallel engine averages gradients over ranks, so the gradient is that of the mean loss
over the global batch (every sequence holds the same number of targets). A step whose loss or gradient norm is
NaN/Inf on any rank is skipped on all ranks (no optimizer step; the LR schedule and the data still advance);
max_nan_steps skips in a row stop training with TrainingError. Under pipeline parallelism the step's micro-batches
go through the pipeline schedule instead (parallel/pipeline.py), with the same loss and gradient.

Schedule-aware accumulation of the CMS levels (model.cms.levels[l].period = K_l; optimizer param groups tagged
with "period", training/optimizer.py). Steps are numbered from 1; level l is *due* at step s when s % K_l == 0.
  * Gradients of a level accumulate locally, over the micro-batches and over the steps of its window (the K_l
    steps ending at a due step); under FSDP2 the level is its own sharding unit whose gradient sync is off on
    the steps where it is not due, so those steps reduce nothing for it and (its unsharded parameters being
    kept between steps) gather nothing either. On the due step the accumulated gradient is reduced once.
  * The accumulated gradient is divided by K_l on the due step: it is the mean of its window's K_l per-step
    gradients (each the gradient of that step's mean loss), so its scale is a one-step gradient's.
  * Gradient clipping and the non-finite check take the global norm over the groups due this step only;
    pending accumulators are neither counted nor scaled (they are clipped on their own due step).
  * Only due groups step (the others are left out of optimizer.step): a level's parameters do not change
    between its due steps, and AdamW's per-parameter step count (bias correction) advances once per level step,
    i.e. counts the level's own updates.
  * Learning rate: the schedule is evaluated at the global step on which the level steps; the level's peak lr is
    optim.lr x K_l ** optim.cms_lr_period_exponent (default exponent 0: the same lr). Weight decay is AdamW's
    decoupled lr x weight_decay per level step, so over a run a slow level gets 1/K_l of the fast levels' decay
    (no compensation).
  * A skipped (non-finite) step drops the due groups' gradients; the pending accumulators are kept (a non-finite
    contribution to them makes their own due step non-finite, which is then skipped and dropped in turn).
  * The pending accumulators (the gradients of levels not due: pending_gradients()) and the step counter
    `steps_done` (from which every level's phase follows) are training state, saved in checkpoints with the
    optimizer (checkpoints/state.py).
K_l = 1 for every level is the plain trainer. Not available with pipeline parallelism or the DeepSpeed engine
(rejected by the config checks).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from megatron_hope.config import Config
from megatron_hope.parallel.data_parallel import accumulated_gradients, set_accumulated_gradients
from megatron_hope.parallel.pipeline import Pipeline
from megatron_hope.training.comm_counter import CommCounter
from megatron_hope.training.grad_clip import clip_grad_norm
from megatron_hope.training.optimizer import due_groups, step_groups
from megatron_hope.training.metrics import RunLogger, peak_memory_gib

Batch = dict  # {"tokens": (B, T + 1) int64, "doc_start": (B, T) bool, ...} from the data loader


class TrainingError(RuntimeError):
    """Training cannot continue; the message says why and what to change."""


@dataclass
class StepResult:
    step: int  # 1-based optimizer step
    loss: float  # mean over the global batch
    grad_norm: float  # before clipping
    lr: float
    skipped: bool  # non-finite loss or gradient norm: no update


@dataclass
class TrainResult:
    steps: list[StepResult] = field(default_factory=list)
    val_loss: float | None = None  # of the final evaluation

    @property
    def perplexity(self) -> float | None:
        return None if self.val_loss is None else perplexity(self.val_loss)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float beyond ~709


def batch_loss(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Mean next-token loss of one micro-batch: inputs tokens[:, :-1] predict targets tokens[:, 1:]. Under tensor
    parallelism the caller holds loss_context() (the logits are vocab-sharded)."""
    tokens = batch["tokens"].to(device, non_blocking=True)
    doc_start = batch["doc_start"].to(device, non_blocking=True)
    return model(tokens[:, :-1], doc_start, tokens[:, 1:])


def loss_context(cfg: Config) -> contextlib.AbstractContextManager:
    """Vocab-parallel cross-entropy for forward and backward under tensor parallelism."""
    return loss_parallel() if cfg.parallel.tensor_model_parallel_size > 1 else contextlib.nullcontext()


def value(t: torch.Tensor) -> torch.Tensor:
    """A detached plain tensor (a tensor-parallel loss is a replicated DTensor)."""
    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)  # SUM: gloo has no AVG
        value /= world_size()
    return value


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], micro_batches: int, device: torch.device) -> float:
    """Mean loss over the first `micro_batches` micro-batches of every rank (fewer if the data ends first)."""
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for batch in islice(batches, micro_batches):
        total += value(batch_loss(model, batch, device)).float()
        count += 1
    model.train()
    if count == 0:
        raise TrainingError("the validation data yielded no batch; check data.val_manifest")
    return mean_over_ranks(total / count).item()


def evaluate_pipeline(pipeline: Pipeline, batches: Iterable[Batch], steps: int, accum: int) -> float:
    """evaluate() through the pipeline schedule: `steps` groups of `accum` micro-batches (fewer if the data
    ends first; a partial group is left out)."""
    batches, losses = iter(batches), []
    for _ in range(steps):
        group = list(islice(batches, accum))
        if len(group) < accum:
            break
        losses.append(pipeline.evaluate(group))
    if not losses:
        raise TrainingError("the validation data yielded no full step of micro-batches; check data.val_manifest")
    return torch.stack(losses).mean().item()


@dataclass
class Trainer:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    cfg: Config
    device: torch.device
    logger: RunLogger
    flops_per_token: float  # training FLOPs per token of the model (for MFU)
    peak_flops: float | None  # per device; None: MFU not reported
    pipeline: Pipeline | None = None  # pipeline parallelism: runs the micro-batches; model is this rank's part
    steps_done: int = 0  # optimizer steps taken (skipped ones included); the phase of every CMS level's period
    nan_run: int = 0  # consecutive non-finite steps up to steps_done
    comm_counter: CommCounter | None = None  # active during each step; its bytes (all collectives, and
    # reductions alone, per mesh dim; FSDP2 gradient reductions per parameter group) are logged per step as "comm"

    def __post_init__(self):
        self._periods = {g["cms_level"]: g["period"] for g in self.optimizer.param_groups
                         if g.get("cms_level") is not None}
        # FSDP2 units of CMS levels with a period > 1 (data_parallel.apply_fsdp), by level
        self._level_units: list[tuple[int, nn.Module]] = []
        if self._periods:
            from torch.distributed.fsdp import FSDPModule

            from megatron_hope.model.cms import cms_level_of
            for name, module in self.model.named_modules():
                level = cms_level_of(name + ".x")
                if isinstance(module, FSDPModule) and level is not None and name.split(".")[-2:-1] == ["levels"]:
                    self._level_units.append((level, module))

    def step(self, micro_batches: list[Batch]) -> tuple[float, float, bool]:
        """One optimizer step over this rank's micro-batches -> (global mean loss, grad norm, skipped)."""
        pp = self.pipeline
        self.steps_done += 1
        due = due_groups(self.optimizer, self.steps_done)
        for level, unit in self._level_units:
            is_due = self.steps_done % self._periods[level] == 0
            unit.set_requires_gradient_sync(is_due, recurse=False)
            unit.set_reshard_after_backward(is_due, recurse=False)
        with loss_context(self.cfg):
            if pp is None:
                total = torch.zeros((), device=self.device)
                for batch in micro_batches:
                    loss = batch_loss(self.model, batch, self.device)
                    (loss / len(micro_batches)).backward()
                    total += value(loss).float()
                loss = mean_over_ranks(total / len(micro_batches))
            else:
                loss = pp.train_step(micro_batches)
        due_ids = {id(p) for g in due for p in g["params"]}
        due_params = [p for p in self.model.parameters() if id(p) in due_ids]  # in model order, as the plain trainer
        with torch.no_grad():
            for g in due:  # the window's summed gradients -> their mean
                if g["period"] > 1:
                    for p in g["params"]:
                        if p.grad is not None:
                            p.grad.div_(g["period"])
        norm = clip_grad_norm(due_params, self.cfg.optim.grad_clip,
                              pp.norm_group if pp else None, pp.counted_elsewhere if pp else ())
        loss_value, norm_value = loss.item(), norm.item()
        skipped = not (math.isfinite(loss_value) and math.isfinite(norm_value))
        if not skipped:
            if len(due) == len(self.optimizer.param_groups):
                self.optimizer.step()
            else:
                step_groups(self.optimizer, due)
        for p in due_params:  # pending levels keep their accumulators
            p.grad = None
        return loss_value, norm_value, skipped

    def pending_gradients(self) -> dict[str, torch.Tensor]:
        """This rank's pending accumulators by parameter name: the local (not yet reduced, unsharded) gradient
        sums of the CMS levels whose period does not end at steps_done, i.e. whose window is open."""
        if self._level_units:
            return {f"{name}.{n}": g for name, unit in self._open_units() for n, g in accumulated_gradients(unit).items()}
        return {n: p.grad.detach() for n, p in self._open_plain_parameters() if p.grad is not None}

    def restore_pending_gradients(self, pending: dict[str, torch.Tensor]) -> None:
        """Put pending accumulators (pending_gradients() of a checkpoint) back, before the next step."""
        if self._level_units:
            units = dict(self._open_units())
            by_unit = {name: {} for name in units}
            for key, grad in pending.items():
                unit = next((u for u in units if key.startswith(u + ".")), None)
                if unit is None:
                    raise self._not_pending(key)
                by_unit[unit][key.removeprefix(unit + ".")] = grad
            for name, grads in by_unit.items():
                set_accumulated_gradients(units[name], grads)
            return
        params = dict(self._open_plain_parameters())
        with torch.no_grad():
            for name, grad in pending.items():
                if name not in params:
                    raise self._not_pending(name)
                p = params[name]
                if p.shape != grad.shape:
                    raise TrainingError(f"pending CMS gradient {name}: shape {tuple(grad.shape)} in the checkpoint, "
                                        f"{tuple(p.shape)} here")
                p.grad = grad.to(device=p.device, dtype=p.dtype).clone()

    @staticmethod
    def _not_pending(name: str) -> TrainingError:
        return TrainingError(f"the checkpoint holds a pending CMS gradient for {name}, which is not pending in this "
                             "run; resume with the model.cms.levels periods it was saved with")

    def _open_levels(self) -> set[int]:
        return {lvl for lvl, k in self._periods.items() if self.steps_done % k}

    def _open_units(self) -> list[tuple[str, nn.Module]]:
        """(name, FSDP2 unit) of the levels whose window is open."""
        units = [u for lvl, u in self._level_units if lvl in self._open_levels()]
        return [(name, m) for name, m in self.model.named_modules() if m in units]

    def _open_plain_parameters(self) -> list[tuple[str, nn.Parameter]]:
        from megatron_hope.model.cms import cms_level_of
        open_levels = self._open_levels()
        return [(n, p) for n, p in self.model.named_parameters() if cms_level_of(n) in open_levels]

    def fit(self, batches: Iterator[Batch], val_batches: Callable[[], Iterable[Batch]] | None,
            after_step: Callable[[int], bool] | None = None) -> TrainResult:
        """Run steps steps_done + 1 ... train.train_steps on `batches` (this rank's micro-batches); evaluate every
        eval_interval steps and at the end on a fresh `val_batches()` iterable (None: no evaluation).
        after_step(step) runs after each step (checkpointing); when it returns True, training stops there,
        without the final evaluation."""
        t = self.cfg.train
        accum = self.cfg.grad_accum_steps(self.dp_size)
        tokens_per_step = t.global_batch_size * t.seq_len
        result = TrainResult()
        interval_seconds, interval_steps = 0.0, 0
        for step in range(self.steps_done + 1, t.train_steps + 1):
            lr = self.optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            counter = self.comm_counter
            before = ((dict(counter.bytes), dict(counter.reduced), dict(counter.by_group)) if counter is not None
                      else None)
            micro_batches = [next(batches) for _ in range(accum)]
            with self.comm_counter if self.comm_counter is not None else contextlib.nullcontext():
                loss, norm, skipped = self.step(micro_batches)
            interval_seconds += time.perf_counter() - start
            if before is not None:  # this step's bytes per mesh dim: all collectives, and reductions alone
                sent = {f"bytes_{k}": v - before[0].get(k, 0) for k, v in counter.bytes.items()}
                sent |= {f"reduced_bytes_{k}": v - before[1].get(k, 0) for k, v in counter.reduced.items()}
                sent |= {f"reduced_bytes_group_{k}": v - before[2].get(k, 0) for k, v in counter.by_group.items()}
                self.logger.scalars(step, "comm", sent)
            interval_steps += 1
            self.scheduler.step()
            result.steps.append(StepResult(step, loss, norm, lr, skipped))
            self.logger.advance(loss)
            self.logger.scalars(step, "train", {"loss": loss, "lr": lr, "grad_norm": norm})
            if skipped:
                self.nan_run += 1
                self.logger.message(f"step {step}: loss {loss}, grad norm {norm}: not finite, update skipped "
                                    f"({self.nan_run} in a row, limit train.max_nan_steps = {t.max_nan_steps})")
                if self.nan_run >= t.max_nan_steps:
                    raise TrainingError(
                        f"{self.nan_run} consecutive steps (up to step {step}) had a NaN/Inf loss or gradient norm; "
                        f"stopping (train.max_nan_steps = {t.max_nan_steps}). Lower optim.lr, raise "
                        "optim.warmup_steps or set optim.grad_clip, and check the data")
            else:
                self.nan_run = 0
            if step % t.log_interval == 0 or step == t.train_steps:
                self._log_throughput(step, loss, norm, lr, tokens_per_step * interval_steps / interval_seconds)
                interval_seconds, interval_steps = 0.0, 0
            if val_batches is not None and t.eval_interval and step % t.eval_interval == 0 and step < t.train_steps:
                self._evaluate(step, val_batches)
            if after_step is not None and after_step(step):
                return result
        if val_batches is not None:
            result.val_loss = self._evaluate(t.train_steps, val_batches)
        return result

    def _log_throughput(self, step: int, loss: float, norm: float, lr: float, tokens_per_s: float) -> None:
        values = {"tokens_per_s": tokens_per_s, "peak_mem_gib": peak_memory_gib(self.device)}
        line = (f"step {step}/{self.cfg.train.train_steps} | loss {loss:.4f} | lr {lr:.3e} | grad_norm {norm:.3f}"
                f" | tokens/s {tokens_per_s:,.0f}")
        if self.peak_flops:
            values["mfu"] = self.flops_per_token * tokens_per_s / (self.peak_flops * world_size())
            line += f" | mfu {100 * values['mfu']:.2f}%"
        line += f" | peak mem {values['peak_mem_gib']:.2f} GiB"
        self.logger.scalars(step, "perf", values)
        self.logger.message(line)

    @property
    def dp_size(self) -> int:
        return world_size() // self.cfg.parallel.model_parallel_size

    def _evaluate(self, step: int, val_batches: Callable[[], Iterable[Batch]]) -> float:
        accum = self.cfg.grad_accum_steps(self.dp_size)
        with loss_context(self.cfg):
            if self.pipeline is None:
                loss = evaluate(self.model, val_batches(), self.cfg.train.eval_batches * accum, self.device)
            else:
                loss = evaluate_pipeline(self.pipeline, val_batches(), self.cfg.train.eval_batches, accum)
        self.logger.scalars(step, "val", {"loss": loss, "perplexity": perplexity(loss)})
        self.logger.message(f"step {step}: val loss {loss:.4f} | perplexity {perplexity(loss):.2f}")
        return loss
