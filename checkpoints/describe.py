"""What `python -m checkpoints inspect` shows: a run's checkpoints (step, size, whether the files are complete,
`latest`, partial saves), or one checkpoint (counters, layout, code version, model, tensors, bytes). Also how a
path given on the command line is read: a checkpoint, a run, or a run's checkpoints/ directory."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from checkpoints.errors import CheckpointError
from checkpoints.export import model_config
from checkpoints.layout import TMP_PREFIX, checkpoints_root, read_latest, step_dirs, step_of
from checkpoints.manifest import MANIFEST, problems
from checkpoints.safe_reader import SafeFileSystemReader
from checkpoints.state import RUN_STATE, Layout
from megatron_hope.model.summary import count_parameters

USAGE = "give runs/NAME/checkpoints/step_NNNNNNNN"


def run_checkpoints(path: Path) -> Path | None:
    """The checkpoints/ directory that `path` names (a run directory or its checkpoints/), or None when `path`
    is something else (e.g. one checkpoint)."""
    if (path / "checkpoints").is_dir():
        return checkpoints_root(path)
    if path.name == "checkpoints" or step_dirs(path) or (path / "latest").is_file():
        return path
    return None


def checkpoint_dir(path: Path) -> Path:
    """`path` as one checkpoint directory; CheckpointError (naming the fix) if it does not exist, is a run or
    is not a checkpoint. Whether its files are intact is manifest.problems' job."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; {USAGE}")
    root = run_checkpoints(path)
    if root is not None:
        latest = read_latest(root)
        example = f", e.g. {latest} (latest)" if latest is not None else ""
        raise CheckpointError(f"{path} is a run's checkpoint directory, not one checkpoint; give one of its "
                              f"step_NNNNNNNN directories{example} (`inspect {path}` lists them)")
    if not path.is_dir() or not ((path / RUN_STATE).is_file() or (path / MANIFEST).is_file()):
        raise CheckpointError(f"{path} is not a checkpoint (no {MANIFEST} or {RUN_STATE}); {USAGE}")
    return path


def size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe_run(root: Path) -> list[str]:
    """One line per checkpoint under `root` (newest first): step, MiB, complete (manifest.problems without
    hashes) or what is wrong, and which one `latest` names; then the partial saves and `latest`."""
    dirs = step_dirs(root)
    if not dirs:
        raise CheckpointError(f"{root} holds no complete checkpoint (step_NNNNNNNN directory)")
    latest = read_latest(root)
    lines = [f"{'step':>10} {'MiB':>10}  files (sizes, metadata; `verify` checks sha256)"]
    for d in dirs:
        found = problems(d, checksums=False)
        state = "complete" if not found else f"INVALID: {'; '.join(found)}"
        lines.append(f"{step_of(d):>10} {size_bytes(d) / 2**20:10.2f}  {state}{'  <- latest' if d == latest else ''}")
    for partial in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(TMP_PREFIX)):
        lines.append(f"partial save {partial.name}: never resumed from; `--resume auto` removes it")
    if latest is None:
        lines.append("latest: none (no `latest` file)")
    elif not latest.is_dir():
        lines.append(f"latest: {latest.name} (missing!)")
    else:
        lines.append(f"latest: {latest.name}")
    return lines


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete (`verify` lists what)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the checkpoint is damaged") from None


def describe_checkpoint(path: Path) -> list[str]:
    """Step and tokens, the saving layout, the code version, the model, whether the files are complete, the
    model's tensor entries (name, shape, dtype) and a summary of the optimizer's."""
    cfg = model_config(path)
    found = problems(path, checksums=False)
    total = size_bytes(path)
    periods = ", ".join(str(level.period) for level in cfg.cms.levels)
    return [f"checkpoint: {path}",
            *run_lines(path / RUN_STATE),
            f"model: {cfg.arch}, {count_parameters(cfg)['total']:,} parameters, d_model {cfg.d_model}, "
            f"{cfg.n_layers} layers, {cfg.n_heads} heads, vocab {cfg.vocab_size}, tied head {cfg.tie_embeddings}"
            + (f", CMS periods {periods}" if cfg.arch == "hope" else ""),
            f"bytes: {total:,} ({total / 2**20:.2f} MiB)",
            "files: complete (sizes and metadata agree with the manifest; `verify` checks sha256)" if not found
            else f"files: INVALID: {'; '.join(found)}",
            *tensor_lines(path)]


def run_lines(run_state: Path) -> list[str]:
    """Counters, loader position, saving layout and code version from run_state.json."""
    run = _read_json(run_state)
    try:
        code = run["code_version"]
        return [f"step: {run['step']}",
                f"consumed tokens: {run['consumed_tokens']:,}",
                "loader: " + ", ".join(f"{k} {v}" for k, v in run["loader"].items()),
                f"saved by: {Layout(**run['layout']).describe()}",
                f"code version: {code['package']} ({code['commit']})"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{run_state} does not hold a run state of this project ({type(e).__name__}: {e}); "
                              "the checkpoint is damaged or from other code") from None


def tensor_lines(path: Path) -> list[str]:
    """The DCP metadata's "model" entries one by one, its "optim" entries counted per kind of state."""
    try:
        metadata = SafeFileSystemReader(str(path)).read_metadata()
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no .metadata: the checkpoint is incomplete (`verify` lists what)") from None
    entries = {k: m for k, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    model = {k.removeprefix("model."): m for k, m in sorted(entries.items()) if k.startswith("model.")}
    lines = [f"model tensors: {len(model)}"]
    width = max((len(k) for k in model), default=0)
    for name, meta in model.items():
        dtype = str(meta.properties.dtype).removeprefix("torch.")
        lines.append(f"  {name:<{width}}  {str(tuple(meta.size)):<18} {dtype}")
    kinds = Counter(k.rsplit(".", 1)[-1] for k in entries if k.startswith("optim."))
    if kinds:
        lines.append("optimizer state: " + ", ".join(f"{kind} x {n}" for kind, n in sorted(kinds.items())))
    return lines
