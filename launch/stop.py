"""Stop requests: SIGUSR1 (SLURM's --signal=USR1@T before the time limit) or SIGTERM (preemption, scancel,
a requeue) asks the run to save a checkpoint at the end of the current step and stop. All ranks agree on the
step: each step's flag is the maximum over ranks."""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early with a checkpoint; run again with --resume auto to continue


class StopRequest:
    """Installs the handlers; `agreed(device)` is collective and says whether any rank was signalled."""

    def __init__(self) -> None:
        self.signal: str | None = None  # the signal this rank received
        self.requested = False  # some rank was signalled (set by agreed())
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        self.signal = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.signal else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.requested = self.requested or bool(flag.item())
        return self.requested
