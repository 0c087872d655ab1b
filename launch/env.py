"""Which process this is: rank, world size and device, from torchrun's environment (a lone process otherwise)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from megatron_hope.config_base import ConfigError


@dataclass(frozen=True)
class ProcessEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> ProcessEnv:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        present = [n for n in names if n in environ]
        if not present:
            return cls()
        if len(present) < len(names):
            raise ConfigError(f"the environment sets {present} but not {sorted(set(names) - set(present))}; "
                              "launch with torchrun, or unset them for a single process")
        try:
            env = cls(*(int(environ[n]) for n in names))
        except ValueError:
            raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got "
                              f"{[environ[n] for n in names]}") from None
        if not 0 <= env.rank < env.world_size:
            raise ConfigError(f"RANK = {env.rank} is outside 0..WORLD_SIZE-1 = {env.world_size - 1}")
        return env

    def device(self, kind: str = "auto") -> torch.device:
        """This rank's device for train.device = `kind` ("auto", "cpu" or "cuda"): GPU local_rank, or the CPU."""
        if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise ConfigError("train.device = 'cuda' but CUDA is not available here; use 'auto' or 'cpu'")
        if self.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"train.device = {kind!r}: local rank {self.local_rank} has no GPU of its own "
                              f"({torch.cuda.device_count()} visible); start at most that many processes per node "
                              "or set train.device = 'cpu'")
        return torch.device("cuda", self.local_rank)
