"""A checkpoint's model, consolidated in one process: for inference with HopeLM (safetensors + config.toml) and
under megatron-core's names (one safetensors file per tensor-parallel rank). Reads through SafeFileSystemReader:
nothing but allow-listed metadata and tensors is unpickled."""
from __future__ import annotations

import tomllib
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from checkpoints.errors import CheckpointError
from checkpoints.manifest import verify
from checkpoints.safe_reader import SafeFileSystemReader
from checkpoints.state import CONFIG
from megatron_hope.config import Config, ModelConfig
from megatron_hope.config_base import from_dict, to_toml
from megatron_hope.model.lm import HopeLM

WEIGHTS = "model.safetensors"


def model_config(checkpoint: Path) -> ModelConfig:
    return from_dict(ModelConfig, tomllib.loads((checkpoint / CONFIG).read_text())["model"], "model")


def read_model(checkpoint: Path, checksums: bool = True) -> dict[str, torch.Tensor]:
    """The full fp32 parameters by HopeLM state-dict name, read from a verified checkpoint without a process
    group (every shard of every rank goes into one tensor per name)."""
    verify(checkpoint, checksums)
    metadata = SafeFileSystemReader(str(checkpoint)).read_metadata()
    model = {key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    state = {"model": model}
    dcp.load(state, storage_reader=SafeFileSystemReader(str(checkpoint)), no_dist=True)
    return state["model"]


def export(checkpoint: Path, out: Path) -> Path:
    """out/model.safetensors (consolidated parameters) + out/config.toml (the model; the other sections are
    defaults); load_exported() builds the model from them."""
    params = read_model(checkpoint)
    cfg = model_config(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in params.items()}, str(out / WEIGHTS))
    (out / CONFIG).write_text(to_toml(Config(model=cfg)))
    return out / WEIGHTS


def load_exported(directory: Path) -> HopeLM:
    """The HopeLM of an export() directory, on the CPU in eval mode, every parameter loaded (strict)."""
    cfg = from_dict(ModelConfig, tomllib.loads((directory / CONFIG).read_text())["model"], "model")
    model = HopeLM(cfg)
    model.load_state_dict(load_file(str(directory / WEIGHTS)), strict=True)
    return model.eval()


def to_megatron_core(checkpoint: Path, out: Path, tp: int = 1) -> list[Path]:
    """The model under megatron-core's names (integrations/megatron_core/weights.py), one safetensors file per
    tensor-parallel rank: out (tp = 1) or out with _tp{rank} before the suffix."""
    from megatron_hope.integrations.megatron_core.weights import to_megatron

    cfg = model_config(checkpoint)
    if cfg.n_heads % tp:
        raise CheckpointError(f"--tp {tp} does not divide model.n_heads = {cfg.n_heads}")
    ranks = to_megatron(read_model(checkpoint), cfg, tp)
    paths = [out if tp == 1 else out.with_name(f"{out.stem}_tp{r}{out.suffix}") for r in range(tp)]
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, state in zip(paths, ranks, strict=True):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return paths
