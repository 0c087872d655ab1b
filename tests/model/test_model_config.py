"""Model config validation: a wrong value raises ConfigError naming the field; every preset loads."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_hope.config import load
from megatron_hope.config_base import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

PRESETS = sorted(p.name for p in CONFIGS.glob("*.toml"))


@pytest.mark.parametrize("overrides, field", [
    (["--model.n_heads=5"], "model.n_heads"),
    (["--model.d_model=0"], "model.d_model"),
    (["--model.arch=transformerpp", "--model.d_model=72", "--model.n_heads=8"], "head_dim"),
    (["--model.init_std=0"], "model.init_std"),
    (["--model.memory.chunk_size=0"], "model.memory.chunk_size"),
    (["--model.cms.inner_lr=-1"], "model.cms.inner_lr"),
    (["--model.arch=titans", "--model.cms.inner_updates=true"], "model.cms.inner_updates"),
    (["--model.arch=hopes"], "model.arch"),
])
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load(str(CONFIGS / "hope_tiny.toml"), overrides)


def test_cms_level_checks(tmp_path):
    base = (CONFIGS / "hope_tiny.toml").read_text()
    bad_chunk = base.replace("inner_chunk = 32", "inner_chunk = 24")
    (tmp_path / "a.toml").write_text(bad_chunk)
    with pytest.raises(ConfigError, match=r"model\.cms\.levels\[1\]\.inner_chunk"):
        load(str(tmp_path / "a.toml"))
    (tmp_path / "b.toml").write_text(base.replace("hidden = 48", "hidden = 0"))
    with pytest.raises(ConfigError, match=r"model\.cms\.levels\[1\]\.hidden"):
        load(str(tmp_path / "b.toml"))
    no_inner = base.replace("inner_chunk = 16", "inner_chunk = 0").replace("inner_chunk = 32", "inner_chunk = 0")
    (tmp_path / "c.toml").write_text(no_inner)
    with pytest.raises(ConfigError, match=r"model\.cms\.inner_updates"):
        load(str(tmp_path / "c.toml"), ["--model.cms.inner_updates=true"])


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = load(str(CONFIGS / name)).model
    arch = name.split("_")[0]
    assert arch == cfg.arch or arch not in ("hope", "titans", "transformerpp")  # model presets: {arch}_{size}


def test_inner_chunk_is_smallest_active(tiny):
    assert tiny("hope").cms.inner_chunk == 16


def test_inner_chunk_must_be_a_multiple_of_the_memory_chunk():
    """With in-sequence CMS updates the blocks run once per CMS chunk, which must start on the memory's chunk
    grid; without them the level chunks are not used and any value loads."""
    bad = ["--model.memory.chunk_size=32"]  # hope_tiny's levels: inner_chunk 16 and 32
    with pytest.raises(ConfigError, match=r"model\.cms\.levels\[0\]\.inner_chunk = 16 is not a multiple of "
                                          r"model\.memory\.chunk_size = 32"):
        load(str(CONFIGS / "hope_tiny.toml"), [*bad, "--model.cms.inner_updates=true"])
    assert load(str(CONFIGS / "hope_tiny.toml"), bad).model.memory.chunk_size == 32
