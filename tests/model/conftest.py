"""Shared helpers for the model tests: the tiny presets, built in fp64 so that equalities are exact."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_hope.config import ModelConfig, load
from megatron_hope.model.lm import HopeLM

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ARCHS = ("hope", "titans", "transformerpp")


def tiny_config(arch: str, *overrides: str) -> ModelConfig:
    return load(str(CONFIGS / f"{arch}_tiny.toml"), list(overrides)).model


def build_tiny(arch: str, *overrides: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> HopeLM:
    torch.manual_seed(seed)
    return HopeLM(tiny_config(arch, *overrides)).to(dtype)


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture
def build():
    return build_tiny
