"""The closed-form parameter count of every preset equals the built model's, part by part."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_hope.config import load
from megatron_hope.model.lm import HopeLM
from megatron_hope.model.summary import count_parameters, main, mixer_parameters, training_flops_per_token
from megatron_hope.model.titans import SelfModifyingTitans, TitansMixer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted(p.stem for p in CONFIGS.glob("*.toml"))


def measured_parts(model: HopeLM) -> dict[str, int]:
    """Group the built model's parameters the way count_parameters does, from their names."""
    parts = {"embedding": 0, "mixer": 0, "norms": 0, "head": 0}
    for name, p in model.named_parameters():  # a tied head is listed once, as the embedding
        if name.startswith("embed."):
            key = "embedding"
        elif name.startswith("head."):
            key = "head"
        elif ".cms.levels." in name:
            key = "cms.level" + name.split(".cms.levels.")[1].split(".")[0]
        elif ".mixer." in name or ".attn." in name:
            key = "mixer"
        elif ".mlp." in name:
            key = "ffn"
        else:
            assert name.endswith("norm.weight"), name
            key = "norms"
        parts[key] = parts.get(key, 0) + p.numel()
    parts["total"] = sum(parts.values())
    return parts


@pytest.mark.parametrize("preset", PRESETS)
def test_closed_form_matches_model(preset):
    cfg = load(str(CONFIGS / f"{preset}.toml")).model
    with torch.device("cpu" if preset.endswith("tiny") else "meta"):  # large presets: shapes only
        model = HopeLM(cfg)
    expected = count_parameters(cfg)
    assert measured_parts(model) == expected
    assert expected["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset, nominal", [("hope_125m", 125e6), ("hope_350m", 350e6), ("hope_760m", 760e6),
                                             ("hope_1b3", 1.3e9), ("hope_3b", 3e9), ("hope_7b", 7e9)])
def test_presets_are_near_their_nominal_size(preset, nominal):
    total = count_parameters(load(str(CONFIGS / f"{preset}.toml")).model)["total"]
    assert abs(total / nominal - 1) < 0.05, f"{preset}: {total / 1e6:.1f}M"


@pytest.mark.parametrize("arch", ["hope", "titans"])
@pytest.mark.parametrize("variant", [[], ["--model.memory.kind=linear"], ["--model.memory.adaptive_q=true"],
                                     ["--model.conv_width=2", "--model.memory.hidden_mult=3"]],
                         ids=["mlp", "linear", "adaptive_q", "conv2_mult3"])
def test_mixer_closed_form_across_options(tiny, arch, variant):
    cfg = tiny(arch, *variant)
    mixer = (SelfModifyingTitans if arch == "hope" else TitansMixer)(cfg)
    assert mixer_parameters(cfg, self_modifying=arch == "hope") == sum(p.numel() for p in mixer.parameters())


def test_summary_cli(capsys):
    main(["--config", str(CONFIGS / "hope_1b3.toml"), "--seq-len", "2048", "--model.n_layers=2"])
    lines = dict(line.split(": ") for line in capsys.readouterr().out.splitlines())
    cfg = load(str(CONFIGS / "hope_1b3.toml"), ["--model.n_layers=2"]).model
    assert int(lines["params_total"]) == count_parameters(cfg)["total"]
    assert int(lines["params_cms.level2"]) == 2 * (3 * 2048 * 1280 + 2048)
    assert float(lines["training_flops_per_token"]) == pytest.approx(training_flops_per_token(cfg, 2048), rel=1e-5)
    assert lines["seq_len"] == "2048"
