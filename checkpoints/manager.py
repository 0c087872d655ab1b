"""Saving (sync or async, atomic, with retention) and resuming (newest valid checkpoint) of a run's state."""
from __future__ import annotations

import json
import shutil
import threading
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import fields
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from checkpoints.errors import CheckpointError
from checkpoints.layout import checkpoints_root, prune, publish, remove_partial, set_aside, step_dirs, \
    step_name, temporary_dir
from checkpoints.manifest import file_problems, problems, write_manifest
from checkpoints.safe_reader import SafeFileSystemReader
from checkpoints.staging import ReusedBufferStager
from checkpoints.state import CONFIG, RUN_STATE, TrainingState
from megatron_hope.config import CheckpointConfig, Config, ModelConfig
from megatron_hope.config_base import ConfigError, from_dict, to_toml


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
        appears (renamed into place, `latest` updated, old ones pruned) when they are complete. A failed save
        raises CheckpointError naming the cause (here, or from wait() for a background save); its partial
        directory is removed and the earlier checkpoints stay."""
        self.wait()
        start = time.perf_counter()
        step = state.trainer.steps_done
        tmp = temporary_dir(self.root, step)
        try:
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
                future = dcp.async_save(state.tensors(), storage_writer=writer, process_group=self.group,
                                        no_dist=no_dist, async_stager=self.stager)
                future = getattr(future, "upload_completion", future)  # AsyncSaveResponse or Future
                self._thread = threading.Thread(target=self._finish, args=(future, tmp, step), daemon=True,
                                                name=f"checkpoint-{step_name(step)}")
                self._thread.start()
            else:
                dcp.save(state.tensors(), storage_writer=writer, process_group=self.group, no_dist=no_dist)
                self._finish(None, tmp, step)
        except (Exception, CheckpointException) as e:  # DCP's error is a BaseException
            self._discard(tmp, step, e)
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
                removed, damaged = prune(self.root, self.cfg.keep_last, self.cfg.keep_every)
                self.log(f"checkpoint saved: {final}" + (f" (removed {', '.join(p.name for p in removed)})"
                                                          if removed else ""))
                for p in damaged:
                    self.log(f"checkpoint {p.name} is damaged ({'; '.join(file_problems(p))}): kept, not counted "
                             "by retention; delete it when it is no longer needed")
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread by wait()
            self._discard(tmp, step, e)

    def _discard(self, tmp: Path, step: int, error: BaseException) -> None:
        """A save failed: rank 0 removes its partial directory; the error is raised by _raise_error()."""
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        self._error = CheckpointError(f"saving checkpoint {step_name(step)} in {self.root} failed: "
                                      f"{failure_cause(error)}; the partial save was removed and earlier "
                                      "checkpoints are untouched (fix the cause, then continue with --resume auto)")
        self._error.__cause__ = error

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete; raise if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    # --- resuming -------------------------------------------------------------------------------------------

    def find(self, spec: str) -> Path | None:
        """The checkpoint to resume from for checkpoint.resume = `spec`: "auto": this run's newest valid one (None
        if it has no checkpoint; CheckpointError if it has some and every one is damaged); "none": None, after
        setting this run's checkpoints aside (a fresh start on purpose); otherwise the directory given, which must
        be valid. Rank 0 checks the files and tells the others; partial saves of this run are removed and damaged
        checkpoints newer than the one chosen are set aside (renamed, never deleted)."""
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
        if spec == "none":
            if self.root.exists():
                aside = set_aside(self.root, time.strftime("set-aside-%Y%m%d-%H%M%S"))
                self.log(f"checkpoint.resume = none: a fresh start at step 0; this run's earlier checkpoints are "
                         f"kept in {aside}")
            return None, None
        if spec != "auto":
            found = problems(Path(spec), self.cfg.verify_on_load)
            return (None, f"checkpoint.resume = {spec}: " + "; ".join(found)) if found else (spec, None)
        for partial in remove_partial(self.root):
            self.log(f"removed {partial.name}: a save that did not complete")
        damaged = []
        for candidate in step_dirs(self.root):  # newest first; `latest` names the newest published one
            found = problems(candidate, self.cfg.verify_on_load)
            if not found:
                for bad, why in damaged:
                    self.log(f"skipping checkpoint {bad}: {why}; set aside as {set_aside(bad, 'damaged').name}")
                return str(candidate), None
            damaged.append((candidate, "; ".join(found)))
        if damaged:
            listed = "; ".join(f"{bad.name}: {why}" for bad, why in damaged)
            return None, (f"checkpoint.resume = auto: every checkpoint of {self.root.parent.name} is damaged "
                          f"({listed}); nothing was loaded or changed. Restore them, resume another checkpoint "
                          "with --resume DIR, or start this run again at step 0 with --resume none (its "
                          "checkpoints are then kept, renamed)")
        return None, None

    def load(self, state: TrainingState, directory: Path) -> None:
        """Restore `state` from the checkpoint in `directory` (found by find()), resharding to this layout."""
        check_resumable(state.cfg, directory, state.dataset.state_dict())
        run_state = json.loads((directory / RUN_STATE).read_text())

        def read(target: dict) -> None:
            dcp.load(target, storage_reader=SafeFileSystemReader(str(directory)), process_group=self.group,
                     no_dist=self.group is None)

        for note in state.load(directory, run_state, read):
            self.log(note)
        self.log(f"resumed from {directory} at step {run_state['step']}")


# run_state.json's loader entries -> the setting that decides them
LOADER_SETTINGS = {"seq_len": "train.seq_len", "seed": "data.seed", "split": "the training split"}


def check_resumable(cfg: Config, directory: Path, loader_state: dict) -> None:
    """The checkpoint in `directory` continues this run exactly: the same model (architecture and every size)
    and the same data stream (the entries of `loader_state`, this run's loader state_dict(), that say which:
    sequence length, data seed, split, shard contents). CheckpointError naming the setting and the fix
    otherwise."""
    saved_cfg = _read(directory, CONFIG, tomllib.loads, tomllib.TOMLDecodeError)
    try:
        saved = from_dict(ModelConfig, saved_cfg["model"], "model")
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{directory / CONFIG} holds no model of this code ({e}); the checkpoint is damaged "
                              "or from other code") from None
    if saved != cfg.model:
        diffs = [f"model.{f.name}: {getattr(saved, f.name)!r} saved, {getattr(cfg.model, f.name)!r} now"
                 for f in fields(saved) if f.compare and getattr(cfg.model, f.name) != getattr(saved, f.name)]
        raise CheckpointError(f"checkpoint {directory} holds another model ({'; '.join(diffs)}); resume with its "
                              f"model settings (its {CONFIG}) or start a fresh run")
    loader = _read(directory, RUN_STATE, json.loads, json.JSONDecodeError).get("loader", {})
    for key, setting in LOADER_SETTINGS.items():
        if key in loader_state and loader.get(key) != loader_state[key]:
            raise CheckpointError(f"checkpoint {directory} was saved with {setting} = {loader.get(key)!r}, this run "
                                  f"has {loader_state[key]!r}; an exact resume reads the same data stream: resume "
                                  f"with {setting} = {loader.get(key)!r}, or start a fresh run to change it")
    if "data_fingerprint" in loader_state and loader.get("data_fingerprint") != loader_state["data_fingerprint"]:
        raise CheckpointError(f"checkpoint {directory} was trained on other data than data.train_manifest = "
                              f"{cfg.data.train_manifest!r} (the shards' contents differ: other documents, or shards "
                              "made with another tokenizer); point data.train_manifest and data.tokenizer_dir at "
                              "the data it was trained on, or start a fresh run to change the data")


def _read(directory: Path, name: str, parse, parse_error: type[Exception]) -> dict:
    try:
        return parse((directory / name).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory} is not a checkpoint (no {name}); give a checkpoint directory, "
                              "runs/NAME/checkpoints/step_NNNNNNNN") from None
    except parse_error as e:
        raise CheckpointError(f"{directory / name} is unreadable ({e}): the checkpoint is damaged") from None


def failure_cause(error: BaseException) -> str:
    """The cause of a failed save in one line: the first OSError in the error, its causes and DCP's per-rank
    failures (e.g. "No space left on device (errno 28): .../__0_0.distcp"), else the error's last line."""
    pending, seen = [error], set()
    while pending:
        e = pending.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            return f"{e.strerror} (errno {e.errno})" + (f": {e.filename}" if e.filename else "")
        pending += [e.__cause__, e.__context__]
        if isinstance(e, CheckpointException):
            pending += [failure for failure, _ in e.failures.values()]
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1]}" if lines else type(error).__name__
