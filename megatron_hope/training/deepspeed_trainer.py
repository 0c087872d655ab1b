"""The training step with the DeepSpeed engine (parallel.dp_engine = "deepspeed"; the engine itself is built by
parallel/deepspeed_engine.py)."""
from __future__ import annotations

import torch
from torch import nn

from megatron_hope.training.loop import Batch, Trainer, batch_loss, mean_over_ranks
from megatron_hope.training.optimizer import init_state


def init_optimizer_state(engine: nn.Module) -> None:
    """AdamW's state on DeepSpeed's flat fp32 partitions, created now exactly as its first step would
    (training.optimizer.init_state), so that a checkpoint loads before any step and always has every entry."""
    init_state(engine.optimizer.optimizer)
    engine.optimizer._lazy_init_hp_params_optimizer_state()  # links each parameter to its moments' fragments


class DeepSpeedTrainer(Trainer):
    """The Trainer with `model` a DeepSpeed engine and `optimizer` its client optimizer (for the LR schedule).

    Skipping: a step whose gradient norm is not finite is skipped by DeepSpeed itself on every rank (the norm is
    global): no optimizer update, gradients dropped, and its micro-step counter advances as usual. A non-finite
    loss is routed into that path: when the mean loss over ranks is not finite, the last micro-batch's loss is
    multiplied by NaN before backward, so the global norm is NaN. engine.step() is called after every micro-batch
    either way, which keeps DeepSpeed's accumulation boundary on the last one."""

    def step(self, micro_batches: list[Batch]) -> tuple[float, float, bool]:
        engine = self.model
        self.steps_done += 1
        if len(micro_batches) != engine.gradient_accumulation_steps():
            raise ValueError(f"{len(micro_batches)} micro-batches, but DeepSpeed accumulates "
                             f"{engine.gradient_accumulation_steps()}")
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            loss = batch_loss(engine, batch, self.device)
            total += loss.detach().float()
            if i == len(micro_batches) - 1:
                mean = mean_over_ranks(total / len(micro_batches))
                if not torch.isfinite(mean):
                    loss = loss * float("nan")
            engine.backward(loss)  # DeepSpeed scales by 1 / gradient_accumulation_steps
            engine.step()
        return mean.item(), float(engine.get_global_grad_norm()), not engine.was_step_applied()
