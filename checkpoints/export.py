"""A checkpoint's model, consolidated in one process: for inference with HopeLM (an export directory:
model.safetensors + config.toml) and under megatron-core's names (one safetensors file per tensor-parallel rank),
and back from megatron-core's names to an export directory. Reads through SafeFileSystemReader: nothing but
allow-listed metadata and tensors is unpickled.

With model.tie_embeddings the head is the embedding: the checkpoint holds both names (as HopeLM.state_dict
does), the export file holds embed.weight only and load_exported() ties the head to it again."""
from __future__ import annotations

import re
import tomllib
import warnings
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from checkpoints.errors import CheckpointError
from checkpoints.manifest import verify
from checkpoints.safe_reader import SafeFileSystemReader
from checkpoints.state import CONFIG
from megatron_hope.config import Config, ModelConfig
from megatron_hope.config_base import ConfigError, from_dict, to_toml
from megatron_hope.model.lm import HopeLM

WEIGHTS = "model.safetensors"
TIED_HEAD = "head.weight"


def read_model_config(toml: Path) -> ModelConfig:
    """The [model] table of a run's (or an export's) config.toml."""
    try:
        return from_dict(ModelConfig, tomllib.loads(toml.read_text())["model"], "model")
    except FileNotFoundError:
        raise CheckpointError(f"{toml} does not exist; give a config.toml with a [model] table") from None
    except (tomllib.TOMLDecodeError, KeyError, ConfigError) as e:
        raise CheckpointError(f"{toml} does not hold a valid [model] table ({e}); give the config.toml of the run "
                              "or export the weights come from") from None


def model_config(checkpoint: Path) -> ModelConfig:
    return read_model_config(checkpoint / CONFIG)


def read_model(checkpoint: Path, checksums: bool = True) -> dict[str, torch.Tensor]:
    """The full fp32 parameters by HopeLM state-dict name, read from a verified checkpoint without a process
    group (every shard of every rank goes into one tensor per name)."""
    verify(checkpoint, checksums)
    metadata = SafeFileSystemReader(str(checkpoint)).read_metadata()
    model = {key.removeprefix("model."): torch.empty(meta.size, dtype=_fp32(meta.properties.dtype))
             for key, meta in metadata.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    if not model:
        raise CheckpointError(f"checkpoint {checkpoint} holds no model tensors; it was not saved by this project")
    state = {"model": model}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, storage_reader=SafeFileSystemReader(str(checkpoint)), no_dist=True)
    return state["model"]


def _fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype.is_floating_point else dtype


def export(checkpoint: Path, out: Path) -> Path:
    """out/model.safetensors (consolidated parameters) + out/config.toml (the model; the other sections are
    defaults) of a verified checkpoint; load_exported() builds the model from them."""
    check_export_dir(out)
    return write_export(read_model(checkpoint), model_config(checkpoint), out)


def check_export_dir(out: Path) -> None:
    """`out` may receive an export: it does not exist, or is an empty directory or an earlier export (whose two
    files are replaced); nothing else in it is ever overwritten."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; give a directory for the export (a new one, an empty one or "
                              "an earlier export's)")
    others = sorted(p.name for p in out.iterdir() if p.name not in (WEIGHTS, CONFIG)) if out.is_dir() else []
    if others:
        raise CheckpointError(f"--out {out} holds other files than an export's ({', '.join(others[:3])}"
                              f"{', ...' if len(others) > 3 else ''}); give a new or empty directory, or an "
                              "earlier export's")


def write_export(params: dict[str, torch.Tensor], cfg: ModelConfig, out: Path) -> Path:
    """An export directory of HopeLM parameters (a state dict) and their model config."""
    _check_against_model(params, cfg)
    params = dict(params)
    if cfg.tie_embeddings:
        head = params.pop(TIED_HEAD, None)
        if head is not None and not torch.equal(head, params["embed.weight"]):
            raise CheckpointError("model.tie_embeddings is set but head.weight differs from embed.weight; the "
                                  "weights do not belong to this config")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in params.items()}, str(out / WEIGHTS))
    (out / CONFIG).write_text(to_toml(Config(model=cfg)))
    return out / WEIGHTS


def _check_against_model(params: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """`params` are HopeLM(cfg)'s parameters: the same names and shapes (checked on a meta-device model)."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in HopeLM(cfg).state_dict().items()}
    given = {k: v.shape for k, v in params.items()}
    if cfg.tie_embeddings and "embed.weight" in given:
        given.setdefault(TIED_HEAD, given["embed.weight"])  # the export file's form: the head is the embedding
    wrong = [f"missing {k}" for k in expected.keys() - given.keys()]
    wrong += [f"unexpected {k}" for k in given.keys() - expected.keys()]
    wrong += [f"{k}: {tuple(given[k])}, the model has {tuple(shape)}" for k, shape in expected.items()
              if k in given and given[k] != shape]
    if wrong:
        raise CheckpointError(f"the weights do not fit the model of the config ({'; '.join(sorted(wrong)[:5])}"
                              f"{f' and {len(wrong) - 5} more' if len(wrong) > 5 else ''})")


def load_exported(directory: Path) -> HopeLM:
    """The HopeLM of an export directory, on the CPU in eval mode, every parameter loaded (strict)."""
    cfg = read_model_config(directory / CONFIG)
    params = _load_safetensors(directory / WEIGHTS)
    if cfg.tie_embeddings and "embed.weight" in params:
        params[TIED_HEAD] = params["embed.weight"]
    model = HopeLM(cfg)
    model.load_state_dict(params, strict=True)
    return model.eval()


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def megatron_core_files(out: Path, tp: int) -> list[Path]:
    """Where to_megatron_core writes the TP ranks' files: `out` (tp = 1) or out with _tp{rank} before the suffix."""
    return [out] if tp == 1 else [out.with_name(f"{out.stem}_tp{r}{out.suffix}") for r in range(tp)]


def find_megatron_core_files(path: Path) -> list[Path]:
    """The files to_megatron_core wrote for `path` (the --out it was given, or one of the rank files): `path`
    itself, or its _tp0, _tp1, ... files."""
    rank_file = re.fullmatch(r"(.+)_tp\d+", path.stem)
    if rank_file:  # one rank's file: all of them
        path = path.with_name(rank_file.group(1) + path.suffix)
    elif path.is_file():
        return [path]
    files = []
    while (candidate := path.with_name(f"{path.stem}_tp{len(files)}{path.suffix}")).is_file():
        files.append(candidate)
    if not files:
        raise CheckpointError(f"neither {path} nor {path.stem}_tp0{path.suffix} exists; give the --out path that "
                              "`convert --to megatron-core` wrote")
    return files


def _weights() -> ModuleType:
    """integrations/megatron_core/weights.py (pure torch; its package imports megatron-core, whose warnings about
    optional fused kernels say nothing about a weight conversion)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed")
            from megatron_hope.integrations.megatron_core import weights
    except ImportError as e:
        raise CheckpointError(f"converting to megatron-core's names needs megatron-core installed ({e}); "
                              "requirements.txt pins it") from None
    return weights


def _check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Every dimension megatron-core splits across TP ranks divides by tp."""
    split = {"model.n_heads": cfg.n_heads, "model.vocab_size": cfg.vocab_size}
    if cfg.arch == "hope":
        split |= {f"model.cms.levels[{i}].hidden": level.hidden for i, level in enumerate(cfg.cms.levels)}
    else:
        split["model.ffn_hidden"] = cfg.ffn_hidden
    if tp < 1:
        raise CheckpointError(f"--tp {tp}: the tensor-parallel size must be at least 1")
    wrong = [f"{name} = {size}" for name, size in split.items() if size % tp]
    if wrong:
        raise CheckpointError(f"--tp {tp} does not divide {', '.join(wrong)}; pick a tensor-parallel size that "
                              "divides them")


def to_megatron_core(checkpoint: Path, out: Path, tp: int = 1) -> list[Path]:
    """The model of a verified checkpoint under megatron-core's names (integrations/megatron_core/weights.py),
    one safetensors file per tensor-parallel rank (megatron_core_files)."""
    cfg = model_config(checkpoint)
    _check_tensor_parallel(cfg, tp)
    paths = megatron_core_files(out, tp)
    for path in paths:
        _check_replaceable(path)
    ranks = _weights().to_megatron(read_model(checkpoint), cfg, tp)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, state in zip(paths, ranks, strict=True):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return paths


def _check_replaceable(path: Path) -> None:
    """`path` may receive a safetensors file: it does not exist or is one (an earlier conversion's)."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give --out the path of a .safetensors file to write")
    if path.exists():
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError):
            raise CheckpointError(f"{path} exists and is not a safetensors file; give --out a new path (an earlier "
                                  "conversion's is replaced)") from None


def from_megatron_core(path: Path, config: Path, out: Path) -> Path:
    """An export directory (write_export) of megatron-core weights written by to_megatron_core (`path`: its
    --out), for the model of `config` (a config.toml with a [model] table)."""
    check_export_dir(out)
    cfg = read_model_config(config)
    ranks = [_load_safetensors(f) for f in find_megatron_core_files(path)]
    try:
        native = _weights().from_megatron(ranks, cfg)
    except (KeyError, ValueError, RuntimeError) as e:
        detail = f"no tensor {e.args[0]}" if isinstance(e, KeyError) and " " not in str(e.args[0]) else e.args[0]
        raise CheckpointError(f"{path}: the megatron-core weights do not match the model of {config} ({detail}); "
                              "give the config of the run they were converted from") from None
    return write_export(native, cfg, out)
