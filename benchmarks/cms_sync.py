"""Schedule-aware CMS accumulation: data-parallel bytes per step and step time with CMS periods all 1 vs
(1, 4, 16), at dp 2 and dp 4 on CPU (FSDP2 over gloo, synthetic tokens), and the analytic bytes of the 1.3B
preset on 64 ranks.

`python -m benchmarks.cms_sync` prints `key: value` lines; `bytes_reduction_factor` is the measured dp bytes per
step (all collectives, mean over one 16-step cycle) with periods all 1 over that with (1, 4, 16), at dp 2, on the
CMS-heavy tiny preset (hope_tiny with wide CMS levels). Bytes are counted on the collectives (CommCounter).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import emit

REPO = Path(__file__).resolve().parents[1]
CYCLE = 16  # steps: one period of the slowest level
CMS_HEAVY = ["--model.cms.levels=[{hidden=256,period=1},{hidden=256,period=4},{hidden=256,period=16}]"]


def tiny_config(periods: tuple[int, ...]):
    from megatron_hope.config import load

    cfg = load(str(REPO / "configs" / "hope_tiny.toml"), CMS_HEAVY + [
        "--train.micro_batch_size=2", "--train.global_batch_size=8", "--train.seq_len=64",
        f"--train.train_steps={2 * CYCLE}", "--train.eval_batches=0", "--optim.warmup_steps=1"])
    for level, period in zip(cfg.model.cms.levels, periods, strict=True):
        level.period = period
    return cfg


def worker(periods: tuple[int, ...], out: str) -> None:
    """Under torchrun: 2 x CYCLE steps of the FSDP2 Trainer; the second cycle is measured."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from megatron_hope.model.lm import HopeLM
    from megatron_hope.parallel.data_parallel import apply_fsdp
    from megatron_hope.training.comm_counter import CommCounter
    from megatron_hope.training.loop import Trainer
    from megatron_hope.training.metrics import RunLogger
    from megatron_hope.training.optimizer import build_optimizer
    from megatron_hope.training.schedule import lr_lambda

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    cfg = tiny_config(periods)
    torch.manual_seed(0)
    model = apply_fsdp(HopeLM(cfg.model), mesh, True, list(periods) if max(periods) > 1 else None)
    optimizer = build_optimizer(model, cfg.optim, list(periods))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.train.train_steps))
    trainer = Trainer(model, optimizer, scheduler, cfg, torch.device("cpu"), RunLogger(None, 1, False), 1.0, None)
    accum = cfg.grad_accum_steps(world)
    g = torch.Generator().manual_seed(rank)
    records = []
    for step in range(2 * CYCLE):
        batch = [{"tokens": torch.randint(0, cfg.model.vocab_size, (2, 65), generator=g),
                  "doc_start": torch.zeros(2, 64, dtype=torch.bool)} for _ in range(accum)]
        counter = CommCounter(mesh)
        dist.barrier()
        t0 = time.perf_counter()
        with counter:
            trainer.step(batch)
        seconds = time.perf_counter() - t0
        scheduler.step()
        if step >= CYCLE:
            records.append({"seconds": seconds, "bytes": counter.bytes.get("dp", 0),
                            "reduced": counter.reduced.get("dp", 0)})
    if rank == 0:
        Path(out).write_text(json.dumps(records))
    dist.destroy_process_group()


def measure(periods: tuple[int, ...], nproc: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "benchmarks.cms_sync", "--worker", ",".join(map(str, periods)), "--out", str(out)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-4000:])
        records = json.loads(out.read_text())
    return {"bytes": statistics.mean(r["bytes"] for r in records),
            "reduced": statistics.mean(r["reduced"] for r in records),
            "seconds": statistics.median(r["seconds"] for r in records)}


def analytic_bytes(cfg_path: str, periods: tuple[int, ...], dp: int) -> dict:
    """Per rank and step, mean over a CYCLE: FSDP2 reduce-scatter bytes (fp32 gradients, each parameter's dim 0
    padded to a multiple of dp; every unit every step, a level unit on its due steps) and all-gather bytes of
    the gathered parameters (bf16 on CUDA; the block units twice with reshard_after_forward, a level unit once per
    period)."""
    from megatron_hope.config import load
    from megatron_hope.model.cms import cms_level_of
    from megatron_hope.model.lm import HopeLM

    cfg = load(cfg_path)
    with torch.device("meta"):
        model = HopeLM(cfg.model)
    reduced = gathered = 0.0
    for name, p in model.named_parameters():
        padded = math.ceil(p.shape[0] / dp) * dp * (p.numel() // p.shape[0]) if p.ndim else dp
        level = cms_level_of(name)
        k = periods[level] if level is not None else 1
        in_block = name.startswith("blocks.")
        reduced += 4 * padded / dp / k
        gathered += 2 * padded * (1 if k > 1 or not in_block else 2) / k
    return {"reduced": reduced, "gathered": gathered, "total": reduced + gathered}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--dp", default="2,4", help="data-parallel sizes to measure")
    a = p.parse_args()
    if a.worker:
        worker(tuple(int(k) for k in a.worker.split(",")), a.out)
        return
    emit("preset", "hope_tiny with CMS levels 3 x 256 wide (CMS-heavy), fp32 CPU, gloo, OMP_NUM_THREADS=1")
    factor = None
    for dp in (int(d) for d in a.dp.split(",")):
        res = {periods: measure(periods, dp) for periods in ((1, 1, 1), (1, 4, 16))}
        for periods, r in res.items():
            tag = f"dp{dp}_periods_{'_'.join(map(str, periods))}"
            emit(f"{tag}_bytes_per_step", round(r["bytes"]))
            emit(f"{tag}_reduced_bytes_per_step", round(r["reduced"]))
            emit(f"{tag}_step_ms", 1e3 * r["seconds"])
        emit(f"dp{dp}_reduced_bytes_factor", res[(1, 1, 1)]["reduced"] / res[(1, 4, 16)]["reduced"])
        if dp == 2:
            factor = res[(1, 1, 1)]["bytes"] / res[(1, 4, 16)]["bytes"]
    for periods in ((1, 1, 1), (1, 4, 16)):
        b = analytic_bytes(str(REPO / "configs" / "hope_1b3.toml"), periods, 64)
        tag = f"analytic_1b3_dp64_periods_{'_'.join(map(str, periods))}"
        emit(f"{tag}_reduced_MB_per_step", b["reduced"] / 1e6)
        emit(f"{tag}_gathered_MB_per_step", b["gathered"] / 1e6)
    if factor is not None:
        emit("bytes_reduction_factor", factor)


if __name__ == "__main__":
    main()
