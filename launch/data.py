"""Wires the prepared data into a run: checks it against the config (before any process group starts) and
builds this rank's loaders."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from data_pipeline.dataset import LoaderConfig, PackedTokenDataset
from data_pipeline.errors import DataPipelineError
from data_pipeline.manifest import MANIFEST_FILE, Manifest
from data_pipeline.shards import check_shard_files
from data_pipeline.tokenizer import Tokenizer
from megatron_hope.config import Config
from megatron_hope.config_base import ConfigError


def manifest_dir(path: str) -> Path:
    """The directory of a manifest given as manifest.json or as the directory holding it."""
    p = Path(path)
    return p if p.is_dir() else p.parent


def _load_manifest(field: str, path: str) -> Manifest:
    if Path(path).is_file() and Path(path).name != MANIFEST_FILE:
        raise ConfigError(f"data.{field} = {path!r} is not a {MANIFEST_FILE}; give the file written by "
                          "python -m data_pipeline.prepare or its directory")
    try:
        return Manifest.load(manifest_dir(path))
    except DataPipelineError as e:
        raise ConfigError(f"data.{field}: {e}") from None


def check_data(cfg: Config) -> None:
    """The tokenizer fits the model's vocabulary, the manifests were made with that tokenizer, each split's shards
    are all there with their manifest sizes, and each split holds at least one global batch. Call after
    cfg.validate_run."""
    d, t = cfg.data, cfg.train
    try:
        card = Tokenizer(d.tokenizer_dir).card
    except DataPipelineError as e:
        raise ConfigError(f"data.tokenizer_dir: {e}") from None
    if cfg.model.vocab_size < card.vocab_size:
        raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({card.vocab_size}, data.tokenizer_dir); set model.vocab_size >= {card.vocab_size}")
    wanted = [("train_manifest", "train")] + ([("val_manifest", "val")] if t.eval_batches else [])
    for field, split in wanted:
        manifest = _load_manifest(field, getattr(d, field))
        if manifest.tokenizer_sha256 != card.model_sha256:
            raise ConfigError(f"data.{field} was prepared with a different tokenizer than data.tokenizer_dir = "
                              f"{d.tokenizer_dir!r}; point both at the same data_pipeline output")
        try:
            info = manifest.split(split)
            check_shard_files(manifest_dir(getattr(d, field)), info)
        except DataPipelineError as e:
            raise ConfigError(f"data.{field}: {e}") from None
        stream = info.tokens + info.documents  # the loader appends eos to every document
        need = t.global_batch_size * t.seq_len + 1
        if stream < need:
            raise ConfigError(f"data.{field}: the {split} split holds {stream} tokens, fewer than one batch needs "
                              f"(train.global_batch_size {t.global_batch_size} x train.seq_len {t.seq_len} + 1 = "
                              f"{need}); lower train.global_batch_size or train.seq_len, or add data")


def _dataset(cfg: Config, field: str, split: str, loop: bool, rank: int, world: int) -> PackedTokenDataset:
    loader = LoaderConfig(data_dir=str(manifest_dir(getattr(cfg.data, field))), seq_len=cfg.train.seq_len,
                          micro_batch=cfg.train.micro_batch_size, split=split, seed=cfg.data.seed,
                          shuffle_buffer=cfg.data.shuffle_buffer, loop=loop)
    return PackedTokenDataset(loader, dp_rank=rank, dp_size=world)


def train_dataset(cfg: Config, rank: int, world: int) -> PackedTokenDataset:
    """This rank's training data, endless (epoch after epoch); iterate `train_batches(cfg, dataset)`. Its
    state_dict() is the run's position in the data (a checkpoint restores it before the iteration starts)."""
    return _dataset(cfg, "train_manifest", "train", True, rank, world)


def train_batches(cfg: Config, dataset: PackedTokenDataset) -> Iterator[dict]:
    """The micro-batches of `dataset` from its current position."""
    return iter(dataset.loader(cfg.data.num_workers))


def val_batches(cfg: Config, rank: int, world: int) -> Callable[[], Iterable[dict]]:
    """A factory of this rank's validation micro-batches, each pass from the start of the val split."""
    return lambda: _dataset(cfg, "val_manifest", "val", False, rank, world).loader()
