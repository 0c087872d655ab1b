"""Saving (sync or async, atomic, with retention) and resuming (newest valid checkpoint) of a run's state."""
from __future__ import annotations

import json
import shutil
import threading
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from checkpoints.errors import CheckpointError
from checkpoints.layout import checkpoints_root, prune, publish, remove_partial, step_dirs, \
    step_name, temporary_dir
from checkpoints.manifest import problems, write_manifest
from checkpoints.safe_reader import SafeFileSystemReader
from checkpoints.staging import ReusedBufferStager
from checkpoints.state import CONFIG, RUN_STATE, TrainingState
from megatron_hope.config import CheckpointConfig, ModelConfig
from megatron_hope.config_base import from_dict, to_toml


class CheckpointManager:
    """Saves into run_dir/checkpoints/ and resumes from checkpoints. Every rank makes one (it creates a process
    group for the checkpoint collectives, so that an async save never interleaves with training's) and calls
    every method (they are collective); rank 0 alone writes run files, manifests and `latest`, and prunes."""

    def __init__(self, run_dir: Path, cfg: CheckpointConfig, log: Callable[[str], None]):
        self.root = checkpoints_root(run_dir)
        self.cfg = cfg
        self.log = log
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.stager = ReusedBufferStager()  # async saves stage into the same CPU buffers every time
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # --- saving ---------------------------------------------------------------------------------------------

    def save(self, state: TrainingState, blocking: bool = False) -> float:
        """Save the state after step state.trainer.steps_done; returns the seconds training was blocked. With
        checkpoint.async_save and not `blocking`, the shards are written in the background and the checkpoint
        appears (renamed into place, `latest` updated, old ones pruned) when they are complete."""
        self.wait()
        start = time.perf_counter()
        step = state.trainer.steps_done
        tmp = temporary_dir(self.root, step)
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            (tmp / RUN_STATE).write_text(json.dumps(state.run_state(), indent=1))
            (tmp / CONFIG).write_text(to_toml(state.cfg))
        if self.group is not None:  # the directory exists before any rank writes into it
            dist.barrier(group=self.group)
        state.write_rank_files(tmp)
        writer = dcp.FileSystemWriter(str(tmp), single_file_per_rank=True, sync_files=True)
        no_dist = self.group is None
        if self.cfg.async_save and not blocking:
            future = dcp.async_save(state.tensors(), storage_writer=writer, process_group=self.group, no_dist=no_dist,
                                    async_stager=self.stager)
            future = getattr(future, "upload_completion", future)  # AsyncSaveResponse or Future
            self._thread = threading.Thread(target=self._finish, args=(future, tmp, step), daemon=True,
                                            name=f"checkpoint-{step_name(step)}")
            self._thread.start()
        else:
            dcp.save(state.tensors(), storage_writer=writer, process_group=self.group, no_dist=no_dist)
            self._finish(None, tmp, step)
            self._raise_error()
        return time.perf_counter() - start

    def _finish(self, future: Future | None, tmp: Path, step: int) -> None:
        """After every rank's shards are written (the DCP save, coordinated by rank 0, has returned): rank 0
        writes the manifest, renames the checkpoint into place, points `latest` at it and applies retention."""
        try:
            if future is not None:
                future.result()
            if self.rank == 0:
                write_manifest(tmp, step)
                final = self.root / step_name(step)
                publish(tmp, final)
                removed = prune(self.root, self.cfg.keep_last, self.cfg.keep_every)
                self.log(f"checkpoint saved: {final}" + (f" (removed {', '.join(p.name for p in removed)})"
                                                          if removed else ""))
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete; raise if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"saving a checkpoint in {self.root} failed: {error}; earlier checkpoints are "
                                  "untouched") from error

    # --- resuming -------------------------------------------------------------------------------------------

    def find(self, spec: str) -> Path | None:
        """The checkpoint to resume from for checkpoint.resume = `spec` ("auto": this run's newest valid one,
        None if it has none; otherwise the directory given, which must be valid). Rank 0 checks the files and
        tells the others; partial saves of this run are removed."""
        choice, reason = None, None
        if self.rank == 0:
            choice, reason = self._choose(spec)
        if self.group is not None:
            box = [choice, reason]
            dist.broadcast_object_list(box, src=0, group=self.group)
            choice, reason = box
        if reason is not None:
            raise CheckpointError(reason)
        return None if choice is None else Path(choice)

    def _choose(self, spec: str) -> tuple[str | None, str | None]:
        if spec != "auto":
            found = problems(Path(spec), self.cfg.verify_on_load)
            return (None, f"checkpoint.resume = {spec}: " + "; ".join(found)) if found else (spec, None)
        for partial in remove_partial(self.root):
            self.log(f"removed {partial.name}: a save that did not complete")
        for candidate in step_dirs(self.root):  # newest first; `latest` names the newest published one
            found = problems(candidate, self.cfg.verify_on_load)
            if not found:
                return str(candidate), None
            self.log(f"skipping checkpoint {candidate}: " + "; ".join(found))
        return None, None

    def load(self, state: TrainingState, directory: Path) -> None:
        """Restore `state` from the checkpoint in `directory` (found by find()), resharding to this layout."""
        run_state = json.loads((directory / RUN_STATE).read_text())
        check_compatible(state, directory)

        def read(target: dict) -> None:
            dcp.load(target, storage_reader=SafeFileSystemReader(str(directory)), process_group=self.group,
                     no_dist=self.group is None)

        for note in state.load(directory, run_state, read):
            self.log(note)
        self.log(f"resumed from {directory} at step {run_state['step']}")


def check_compatible(state: TrainingState, directory: Path) -> None:
    """The checkpoint's model is this run's model (architecture and every size)."""
    saved = from_dict(ModelConfig, tomllib.loads((directory / CONFIG).read_text())["model"], "model")
    if saved != state.cfg.model:
        diffs = [f"model.{k}: {v!r} saved, {getattr(state.cfg.model, k)!r} now"
                 for k, v in vars(saved).items() if getattr(state.cfg.model, k) != v]
        raise CheckpointError(f"checkpoint {directory} holds another model ({'; '.join(diffs)}); resume with its "
                              f"model settings (its {CONFIG}) or start a fresh run")
