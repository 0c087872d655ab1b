"""The AdamW parameter groups follow the documented no-decay rule."""
from __future__ import annotations

from pathlib import Path

from megatron_hope.config import OptimConfig, load
from megatron_hope.model.lm import HopeLM
from megatron_hope.training.optimizer import build_optimizer, split_decay

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_no_decay_rule_on_hope_tiny():
    model = HopeLM(load(str(CONFIGS / "hope_tiny.toml")).model)
    decay, no_decay = split_decay(model)
    expected_no_decay = {n for n, p in model.named_parameters()
                         if p.ndim < 2 or n == "embed.weight" or "_init." in n}
    assert set(no_decay) == expected_no_decay
    assert set(decay) == {n for n, _ in model.named_parameters()} - expected_no_decay
    # spot checks of each kind
    for name in ("embed.weight", "norm.weight", "blocks.0.mixer.eta_bias", "blocks.0.mixer.beta_proj.bias",
                 "blocks.0.mixer.gen_init.A", "blocks.1.mixer.mem_init.B", "blocks.0.cms.levels.2.norm.weight"):
        assert name in no_decay, name
    for name in ("blocks.0.mixer.in_proj.weight", "blocks.0.mixer.eta_readout", "blocks.0.mixer.conv.weight",
                 "blocks.1.cms.levels.0.mlp.w_down.weight"):
        assert name in decay, name
    assert "head.weight" not in decay and "head.weight" not in no_decay  # tied: it is embed.weight


def test_untied_head_decays_and_groups_carry_the_settings():
    model = HopeLM(load(str(CONFIGS / "hope_tiny.toml"), ["--model.tie_embeddings=false"]).model)
    decay, _ = split_decay(model)
    assert "head.weight" in decay
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.05, betas=(0.8, 0.9), eps=1e-7))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-7 and g["lr"] == 1e-3 for g in opt.param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
