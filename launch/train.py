"""Train a model: `python -m launch.train --config configs/X.toml [--section.field=value ...]`.

Runs as one process, or as several under torchrun, the deepspeed launcher, srun or an MPI launcher (launch/env.py
detects which; slurm/ has the batch scripts): FSDP2 data parallelism, or DeepSpeed ZeRO-1/2 with
parallel.dp_engine = "deepspeed"; tensor and pipeline parallelism with their parallel.* sizes.
The config is loaded and checked, data included, before any process group starts; a bad value stops every
rank with one message naming the field. Rank 0 writes runs_dir/run_name/: config.toml (the resolved config),
train.log, metrics.jsonl and tensorboard/; every rank writes checkpoints/ (checkpoint.save_interval).

One run at a time uses a run directory (rank 0 holds runs_dir/run_name/.lock). `--resume auto` continues
run_name from its newest valid checkpoint (a fresh start when it has none; refused when every one is damaged);
`--resume none` starts run_name again from step 0, keeping its earlier checkpoints under another name;
`--resume DIR` starts from the checkpoint DIR, in any parallel layout. SIGUSR1, SIGTERM or Ctrl-C saves a
checkpoint at the end of the current step and stops with exit status 75 (a second Ctrl-C stops at once, 130);
under SLURM the job is requeued first, and the requeued job resumes with --resume auto. Errors are one line:
exit status 2 for bad input found before training (config, data, checkpoint to resume, run directory), 1 after.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule

from checkpoints.errors import CheckpointError
from checkpoints.describe import checkpoint_dir
from checkpoints.manager import CheckpointManager, check_resumable
from checkpoints.state import TrainingState, estimated_checkpoint_bytes
from data_pipeline.errors import DataPipelineError
from launch.data import check_data, train_batches, train_dataset, val_batches
from launch.env import ProcessEnv
from launch.run_dir import RunDirectoryInUse, RunLock, check_writable, run_directory
from launch.slurm_requeue import requeue_current_job
from launch.stop import EXIT_INTERRUPTED, EXIT_STOPPED, StopRequest, mark_stopped
from megatron_hope.config import Config, load
from megatron_hope.config_base import ConfigError, to_toml
from megatron_hope.model.lm import HopeLM
from megatron_hope.model.summary import count_parameters, training_flops_per_token
from megatron_hope.model.titans import memory_options
from megatron_hope.ops.memory import resolve_impl
from megatron_hope.parallel import deepspeed_engine
from megatron_hope.parallel.compile import apply_compile
from megatron_hope.parallel.data_parallel import apply_fsdp
from megatron_hope.parallel.mesh import init_mesh
from megatron_hope.parallel.pipeline import Pipeline, build_pipeline
from megatron_hope.parallel.recompute import apply_recompute
from megatron_hope.parallel.tensor_parallel import apply_tensor_parallel
from megatron_hope.training.comm_counter import CommCounter
from megatron_hope.training.deepspeed_trainer import DeepSpeedTrainer, init_optimizer_state
from megatron_hope.training.loop import Trainer, TrainingError, TrainResult
from megatron_hope.training.metrics import RunLogger, peak_flops
from megatron_hope.training.optimizer import build_optimizer, init_state
from megatron_hope.training.schedule import lr_lambda


@dataclass(frozen=True)
class Run:
    """A checked run of this process: what to train, where its outputs go, where it computes."""

    cfg: Config
    run_dir: Path
    env: ProcessEnv
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0


def parse_args(argv: list[str] | None) -> tuple[str, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__.splitlines()[0],
                                     epilog="Any other --section.field=value overrides the config file.")
    parser.add_argument("--config", required=True, help="TOML file, e.g. configs/quickstart.toml")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    parser.add_argument("--resume", help="\"auto\" (this run's newest valid checkpoint), \"none\" (this run again "
                        "from step 0) or a checkpoint directory; sets checkpoint.resume")
    args, overrides = parser.parse_known_args(argv)
    if args.resume is not None:
        overrides.append(f"--checkpoint.resume={args.resume}")
    return args.config, overrides


def prepare(argv: list[str] | None, env: ProcessEnv) -> Run:
    """Load and check everything the run needs; starts no process group and writes nothing."""
    config_path, overrides = parse_args(argv)
    cfg = load(config_path, overrides)
    cfg.validate_run(env.world_size)
    check_data(cfg)
    device = env.device(cfg.train.device)
    check_kernels(cfg, device)
    run_dir = run_directory(cfg, config_path)
    check_writable(run_dir)
    if cfg.checkpoint.resume not in ("", "auto", "none"):  # a checkpoint directory: checked before any rank starts
        check_resumable(cfg, checkpoint_dir(Path(cfg.checkpoint.resume)), train_dataset(cfg, 0, 1).state_dict())
    cfg.train.run_name = run_dir.name  # the resolved config names its run
    return Run(cfg, run_dir, env, device)


def check_kernels(cfg: Config, device: torch.device) -> None:
    """model.memory.impl = "triton" runs on CUDA (or under Triton's interpreter, which the tests use): refused on a
    CPU before any process starts, instead of failing at the first forward."""
    if (cfg.model.arch != "transformerpp" and cfg.model.memory.impl == "triton" and device.type != "cuda"
            and os.environ.get("TRITON_INTERPRET") != "1"):
        raise ConfigError(f"model.memory.impl = 'triton' runs on CUDA and this run is on {device.type}: set "
                          "model.memory.impl = 'auto' (the PyTorch form here)")


def start_process_group(run: Run) -> DeviceMesh | None:
    """The ("pp", "dp", "tp") mesh for several ranks, or for CUDA (FSDP2 provides the bf16 mixed precision even on
    one rank); None for a lone CPU process, which trains the plain model, and for DeepSpeed, which wraps it."""
    if run.cfg.parallel.dp_engine == "deepspeed":
        deepspeed_engine.init_distributed(run.env.rank, run.env.world_size, run.device, run.cfg.train.dist_timeout_s)
        return None
    if run.env.world_size == 1 and run.device.type == "cpu":
        return None
    return init_mesh(run.cfg.parallel, run.env.rank, run.env.world_size, run.device, run.cfg.train.dist_timeout_s)


def build_model(run: Run, mesh: DeviceMesh | None) -> tuple[nn.Module, Pipeline | None]:
    """The model, initialised from train.seed (the same on every rank), sharded with FSDP2 over mesh["dp"], or
    on this process's device without a mesh. With pipeline parallelism: this rank's stages and their pipeline."""
    torch.manual_seed(run.cfg.train.seed)
    model = HopeLM(run.cfg.model)
    if run.cfg.parallel.tensor_model_parallel_size > 1:
        model = apply_tensor_parallel(model.to(run.device), mesh["tp"], run.cfg.parallel.sequence_parallel)
    apply_recompute(model, run.cfg.parallel.recompute_granularity)
    if run.cfg.model.compile:
        apply_compile(model)
    if run.cfg.parallel.pipeline_model_parallel_size > 1:
        pipeline = build_pipeline(model, run.cfg, mesh, run.device)
        return pipeline.model, pipeline
    if mesh is not None:
        return apply_fsdp(model, mesh["dp"], run.cfg.parallel.reshard_after_forward, cms_periods(run.cfg)), None
    return model.to(run.device), None


def describe(run: Run, sharded: bool) -> list[str]:
    cfg, world = run.cfg, run.env.world_size
    t, p = cfg.train, cfg.parallel
    n_params = count_parameters(cfg.model)["total"]
    pipeline = (f" | pipeline {p.pipeline_model_parallel_size} stages x {p.virtual_pipeline_model_parallel_size} "
                "chunks" if p.pipeline_model_parallel_size > 1 else "")
    if p.tensor_model_parallel_size > 1:
        pipeline += (f" | tensor parallel {p.tensor_model_parallel_size}"
                     f"{' + sequence parallel' if p.sequence_parallel else ''}")
    lines = [f"model: {cfg.model.arch}, {n_params / 1e6:.2f}M parameters | {world} process(es) ({run.env.launcher} launch) on "
             f"{run.device.type}{' with FSDP2' if sharded else ''}{pipeline}",
             f"batch: global {t.global_batch_size} = micro {t.micro_batch_size} x dp {p.data_parallel_size} x "
             f"accumulation {cfg.grad_accum_steps(p.data_parallel_size)}; {t.global_batch_size * t.seq_len:,} "
             "tokens per step, "
             f"{t.train_steps} steps"]
    if cfg.model.compile:
        lines.append("model.compile: true (torch.compile per block, inductor; the first steps compile)")
    if cfg.model.arch != "transformerpp":
        m = cfg.model.memory
        opts = memory_options(cfg.model, self_modifying=cfg.model.arch == "hope")
        lines.append(f"memory inner loop: {resolve_impl(m.impl, opts, run.device)} (model.memory.impl = {m.impl}), "
                     f"chunk {m.chunk_size}"
                     f"{f', recomputed in backward {m.recompute_chunks} chunk(s) at a time' if m.recompute_chunks else ''}")
    periods = cms_periods(cfg)
    if periods:
        lines.append(f"CMS levels: outer periods {periods} optimizer steps (gradients accumulate and sync per "
                     "period)")
    return lines


def cms_periods(cfg: Config) -> list[int] | None:
    """The CMS levels' outer periods when any exceeds 1 (schedule-aware accumulation), else None."""
    periods = [lvl.period for lvl in cfg.model.cms.levels] if cfg.model.arch == "hope" else []
    return periods if any(k > 1 for k in periods) else None


def train(run: Run, mesh: DeviceMesh | None, stop: StopRequest | None = None) -> tuple[nn.Module, TrainResult]:
    """Lock the run directory, build everything, resume if asked, and train; `mesh` is start_process_group's;
    `stop` catches the stop signals (installed here if not given). A checkpoint save in flight completes on every
    way out, an error included."""
    cfg = run.cfg
    with run_directory_lock(run) as lock_warning, stop_request(stop) as stop:
        if run.is_main:
            (run.run_dir / "config.toml").write_text(to_toml(cfg))
        logger = RunLogger(run.run_dir, cfg.train.train_steps, enabled=run.is_main)
        try:
            state = build_state(run, mesh, logger)
            for warning in filter(None, (lock_warning, disk_space_warning(run) if run.is_main else None)):
                logger.message(f"warning: {warning}")
            checkpoints = CheckpointManager(run.run_dir, cfg.checkpoint, logger.message)
            with saves_completed(checkpoints, logger):
                resume(cfg, checkpoints, state)
                result = state.trainer.fit(train_batches(cfg, state.dataset),
                                           val_batches(cfg, *data_rank(run, mesh)) if cfg.train.eval_batches else None,
                                           after_step=checkpoint_policy(run, state, checkpoints, stop))
        finally:
            logger.close()
    return state.model, result


def build_state(run: Run, mesh: DeviceMesh | None, logger: RunLogger) -> TrainingState:
    """The model (sharded by the parallel plans, or wrapped by DeepSpeed), its optimizer, LR schedule and trainer,
    and this rank's training data: everything a checkpoint saves."""
    cfg = run.cfg
    model, pipeline = build_model(run, mesh)
    optimizer = build_optimizer(model, cfg.optim, cms_periods(cfg))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.train.train_steps))
    for line in describe(run, any(isinstance(m, FSDPModule) for m in model.modules())):
        logger.message(line)
    trainer_class = Trainer
    if cfg.parallel.dp_engine == "deepspeed":
        model = deepspeed_engine.initialize(model, optimizer, cfg, run.device)
        trainer_class = DeepSpeedTrainer
        logger.message(f"data parallelism: DeepSpeed ZeRO-{cfg.parallel.zero_stage}")
        init_optimizer_state(model)
    else:
        init_state(optimizer)
    trainer = trainer_class(model, optimizer, scheduler, cfg, run.device, logger,
                            training_flops_per_token(cfg.model, cfg.train.seq_len),
                            peak_flops(run.device, cfg.train.peak_flops), pipeline=pipeline)
    if cfg.train.log_comm_bytes:
        trainer.comm_counter = CommCounter(mesh)
        if cfg.parallel.dp_engine == "fsdp2" and mesh is not None:
            trainer.comm_counter.count_fsdp_units(model)
    dataset = train_dataset(cfg, *data_rank(run, mesh))
    return TrainingState(cfg, model, optimizer, scheduler, trainer, dataset, run.env.rank, run.env.world_size)


def data_rank(run: Run, mesh: DeviceMesh | None) -> tuple[int, int]:
    """(this rank's index, the number of ranks) among those that read different data."""
    if mesh is not None:
        return mesh["dp"].get_local_rank(), mesh["dp"].size()
    return run.env.rank, run.env.world_size


@contextlib.contextmanager
def stop_request(given: StopRequest | None) -> Iterator[StopRequest]:
    """`given`, or a StopRequest whose signal handlers are put back when the block ends."""
    if given is not None:
        yield given
        return
    stop = StopRequest()
    try:
        yield stop
    finally:
        stop.close()


@contextlib.contextmanager
def run_directory_lock(run: Run) -> Iterator[str | None]:
    """Rank 0 holds the run directory's lock while the block runs (creating the directory); every rank raises
    ConfigError when another run holds it (naming the holder) or the lock cannot be created. Yields the lock's
    warning (None: locked)."""
    lock, refused = RunLock(run.run_dir), None
    if run.is_main:
        try:
            lock.acquire()
        except RunDirectoryInUse as e:
            refused = str(e)
        except OSError as e:  # the directory or its lock file cannot be created: every rank stops, none waits
            refused = (f"cannot create {lock.path}: {e.strerror or e}; set train.runs_dir to a writable directory "
                       "with free space")
    if dist.is_initialized():
        box = [refused]
        dist.broadcast_object_list(box, src=0)
        refused = box[0]
    if refused:
        raise ConfigError(refused)
    try:
        yield lock.warning
    finally:
        lock.release()


def disk_space_warning(run: Run) -> str | None:
    """A warning when the checkpoints the run keeps at once (keep_last, plus the one being written) may not fit
    in the free space of the run directory's file system."""
    ck, t = run.cfg.checkpoint, run.cfg.train
    planned = (t.train_steps // ck.save_interval if ck.save_interval else 0) + int(ck.save_final)
    at_once = min(ck.keep_last + 1, planned) if ck.keep_last else planned
    each = estimated_checkpoint_bytes(run.cfg)
    free = shutil.disk_usage(run.run_dir).free
    if at_once and free < at_once * each:
        return (f"checkpoints take about {each / 2**30:.2f} GiB each and up to {at_once} exist at once "
                f"(checkpoint.keep_last + the one being written): {at_once * each / 2**30:.2f} GiB, but only "
                f"{free / 2**30:.2f} GiB are free on {run.run_dir}; saves may fail: free space, lower "
                "checkpoint.keep_last or set train.runs_dir elsewhere")
    return None


@contextlib.contextmanager
def saves_completed(checkpoints: CheckpointManager, logger: RunLogger) -> Iterator[None]:
    """Wait for the save in flight when the block ends, however it ends: an error in training does not abandon
    the last checkpoint it started. A failing save is then logged, and the training error is the one raised."""
    try:
        yield
    except BaseException:
        try:
            checkpoints.wait()
        except CheckpointError as e:
            logger.message(f"error: {e}")
        raise
    checkpoints.wait()


def resume(cfg: Config, checkpoints: CheckpointManager, state: TrainingState) -> None:
    """Restore the checkpoint that checkpoint.resume names, if any (see CheckpointManager.find)."""
    spec = cfg.checkpoint.resume
    if not spec:
        return
    resume_from = checkpoints.find(spec)
    if resume_from is not None:
        checkpoints.load(state, resume_from)
        state.trainer.logger.start_at(state.trainer.steps_done)
    elif spec == "auto":
        state.trainer.logger.message(f"no checkpoint in {checkpoints.root}: starting at step 0")


def checkpoint_policy(run: Run, state: TrainingState, checkpoints: CheckpointManager,
                      stop: StopRequest) -> Callable[[int], bool]:
    """The trainer's after_step: save every checkpoint.save_interval steps and after the last step (async when
    configured); save at once (blocking) and stop when a stop signal reached any rank, or at train.stop_at_step."""
    ck, last = run.cfg.checkpoint, run.cfg.train.train_steps

    def after_step(step: int) -> bool:
        stopping = stop.agreed(run.device) or step == run.cfg.train.stop_at_step
        if stopping or (ck.save_interval and step % ck.save_interval == 0) or (ck.save_final and step == last):
            blocked = checkpoints.save(state, blocking=stopping)
            state.trainer.logger.scalars(step, "checkpoint", {"blocking_s": blocked})
            mode = "async" if ck.async_save and not stopping else "sync"
            state.trainer.logger.message(f"step {step}: checkpoint ({mode}) blocked training {blocked:.3f} s")
        if stopping:
            reason = "train.stop_at_step" if not stop.requested else f"stop signal ({stop.signal or 'another rank'})"
            state.trainer.logger.message(f"step {step}: {reason}; checkpoint saved, stopping")
        return stopping

    return after_step


def main(argv: list[str] | None = None) -> int:
    try:
        env = ProcessEnv.from_environ()
        env.export()
        run = prepare(argv, env)
    except (ConfigError, DataPipelineError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = StopRequest()
    mesh = start_process_group(run)
    requeued = False
    try:
        _, result = train(run, mesh, stop)
        if stop.requested:
            requeued = run.is_main and requeue_current_job(os.environ)
            if dist.is_initialized():  # no rank exits (ending an srun --kill-on-bad-exit job) before the requeue
                dist.barrier()
            mark_stopped(os.environ)  # before the stop handlers go: the requeue's SIGTERM may come at any moment
    except ConfigError as e:  # the run directory is in use or cannot be locked
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, CheckpointError, DataPipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a run file that cannot be written (a full disk, a lost mount): the cause, no traceback
        print(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted by a second Ctrl-C before the step's checkpoint; the run's earlier checkpoints "
              "are kept (continue with --resume auto)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        stop.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    if stop.requested:
        if requeued:
            print("stopped by a signal after saving a checkpoint; the SLURM job is requeued")
        return EXIT_STOPPED
    if run.is_main:
        if result.val_loss is not None:
            print(f"val loss: {result.val_loss:.4f}")
            print(f"perplexity: {result.perplexity:.2f}")
        print(f"run directory: {run.run_dir}")
        print(f"tensorboard: tensorboard --logdir {run.run_dir / 'tensorboard'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
