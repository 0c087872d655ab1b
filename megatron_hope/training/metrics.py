"""Training metrics and where they go: a progress bar and one line per log step on stdout, the same lines in
train.log, every scalar in metrics.jsonl and in tensorboard event files. Only rank 0 writes (`enabled`).

MFU = model FLOPs per token (model/summary.training_flops_per_token) x tokens/s / (peak FLOPs x devices).
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm

# Dense bf16 peak FLOP/s per GPU, matched by substring of the device name (first match wins).
CUDA_PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                  ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12)]
# Nominal fp32 peak of one x86 core with AVX2 + 2 FMA units at 2.5 GHz: 2 x 8 lanes x 2 FLOPs x 2.5e9.
CPU_PEAK_PER_THREAD = 80e9


def peak_flops(device: torch.device, override: float = 0.0) -> float | None:
    """Peak FLOP/s of one device (rank): `override` if set, else the CUDA table or the nominal CPU figure
    times this process's threads; None for a GPU missing from the table."""
    if override > 0:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in CUDA_PEAK_BF16 if key in name), None)
    return CPU_PEAK_PER_THREAD * torch.get_num_threads()


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated, or the CPU max resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes on macOS, KiB on Linux


class RunLogger:
    """Rank 0's outputs. With enabled=False every method does nothing, so callers need not check the rank."""

    def __init__(self, run_dir: Path | None, total_steps: int, enabled: bool):
        self.enabled = enabled and run_dir is not None
        self.bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True,
                        disable=not self.enabled, mininterval=1.0)
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where it is used

        self.tensorboard_dir = run_dir / "tensorboard"
        self.writer = SummaryWriter(str(self.tensorboard_dir))
        self.log_file = open(run_dir / "train.log", "a")
        self.jsonl = open(run_dir / "metrics.jsonl", "a")

    def message(self, text: str) -> None:
        """A line on stdout (above the progress bar) and in train.log."""
        if self.enabled:
            tqdm.write(text, file=sys.stdout)
            self.log_file.write(text + "\n")
            self.log_file.flush()

    def scalars(self, step: int, group: str, values: dict[str, float]) -> None:
        """Record values under `group/name` in tensorboard and as one metrics.jsonl record."""
        if self.enabled:
            for name, value in values.items():
                self.writer.add_scalar(f"{group}/{name}", value, step)
            self.jsonl.write(json.dumps({"step": step, "group": group, **values}) + "\n")
            self.jsonl.flush()

    def start_at(self, step: int) -> None:
        """A resumed run: the progress bar counts from `step`."""
        if self.enabled:
            self.bar.update(step)

    def advance(self, loss: float) -> None:
        if self.enabled:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        self.bar.close()
        if self.enabled:
            self.writer.close()
            self.log_file.close()
            self.jsonl.close()
