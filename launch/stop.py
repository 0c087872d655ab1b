"""Stop requests: SIGUSR1 (SLURM's --signal=USR1@T before the time limit), SIGTERM (preemption, scancel, a
requeue) or SIGINT (Ctrl-C) asks the run to save a checkpoint at the end of the current step and stop. All ranks
agree on the step: each step's flag is the maximum over ranks. A second SIGINT stops at once (KeyboardInterrupt),
without waiting for the step to end.

A stopped run exits with EXIT_STOPPED. A launcher that maps its workers' exit status to its own (torchrun reports
any non-zero worker status as a failure with exit 1) cannot pass 75 on; a batch script that wants to tell a clean
stop from a failure sets STOP_FILE_ENV to a path, and every rank that stops cleanly writes EXIT_STOPPED there
(the batch scripts in slurm/ do)."""
from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early with a checkpoint; run again with --resume auto to continue
EXIT_INTERRUPTED = 130  # 128 + SIGINT: a second Ctrl-C stopped the run at once, without the step's checkpoint
STOP_FILE_ENV = "MEGATRON_HOPE_STOP_FILE"


class StopRequest:
    """Installs the handlers; `agreed(device)` is collective and says whether any rank was signalled."""

    def __init__(self) -> None:
        self.signal: str | None = None  # the signal this rank received
        self.requested = False  # some rank was signalled (set by agreed())
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def close(self) -> None:
        """Put back the handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT.name:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, the step's checkpoint is not waited for
        self.signal = signal.Signals(signum).name
        again = "; Ctrl-C again stops at once, without it" if signum == signal.SIGINT else ""
        # os.write, not print: a handler may run while the main thread is inside a print
        os.write(2, f"\n{self.signal}: saving a checkpoint at the end of this step, then stopping{again}\n".encode())

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.signal else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.requested = self.requested or bool(flag.item())
        return self.requested


def mark_stopped(environ: Mapping[str, str]) -> None:
    """Write EXIT_STOPPED to the file named by STOP_FILE_ENV, if set: this rank stopped cleanly."""
    path = environ.get(STOP_FILE_ENV)
    if path:
        Path(path).write_text(f"{EXIT_STOPPED}\n")
