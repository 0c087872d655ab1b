"""Export for inference (model.safetensors + config.toml -> HopeLM on one process) and conversion to and from
megatron-core's names: the trained parameters exactly, and the trained model's logits."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from checkpoint_helpers import damaged_copy, flip_byte
from checkpoints.errors import CheckpointError
from checkpoints.export import (WEIGHTS, export, from_megatron_core, load_exported, model_config, read_model,
                                to_megatron_core)
from megatron_hope.config import load
from megatron_hope.integrations.megatron_core.weights import to_megatron
from megatron_hope.model.lm import HopeLM


def assert_params_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], value), name


def trained_model(run) -> HopeLM:
    """The run's model, built from its own config (not the checkpoint's), with its final parameters."""
    model = HopeLM(load(str(run.config)).model)
    model.load_state_dict(run.params, strict=True)
    return model.eval()


def test_read_model_consolidates_the_trained_parameters(run):
    assert_params_equal(read_model(run.newest), run.params)


def test_exported_model_has_the_trained_parameters_and_logits(run, tmp_path):
    assert export(run.newest, tmp_path) == tmp_path / WEIGHTS
    assert model_config(tmp_path) == load(str(run.config)).model
    stored = load_file(str(tmp_path / WEIGHTS))
    assert stored.keys() == run.params.keys() - {"head.weight"}  # tied: the head is the embedding
    model = load_exported(tmp_path)
    assert model.head.weight is model.embed.weight and not model.training
    assert_params_equal(model.state_dict(), run.params)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens), trained_model(run)(tokens))


def test_export_refuses_a_damaged_checkpoint(run, tmp_path):
    copy, shard = damaged_copy(run.newest, tmp_path, flip_byte)
    with pytest.raises(CheckpointError, match=f"{shard}: sha256 differs"):
        export(copy, tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_core_conversion_round_trips(run, tmp_path, tp):
    paths = to_megatron_core(run.newest, tmp_path / "mcore.safetensors", tp)
    assert [p.name for p in paths] == (["mcore.safetensors"] if tp == 1 else
                                       ["mcore_tp0.safetensors", "mcore_tp1.safetensors"])
    reference = to_megatron(run.params, model_config(run.newest), tp)
    for path, expected in zip(paths, reference, strict=True):
        assert_params_equal(load_file(str(path)), expected)
    back = from_megatron_core(paths[-1], run.newest / "config.toml", tmp_path / "back")
    assert_params_equal(load_exported(back.parent).state_dict(), run.params)


def test_megatron_core_weights_for_another_model_are_refused(run, tmp_path):
    path, = to_megatron_core(run.newest, tmp_path / "mcore.safetensors")
    bigger = tmp_path / "bigger.toml"
    bigger.write_text(run.config.read_text().replace("n_layers = 2", "n_layers = 3"))
    with pytest.raises(CheckpointError, match="no tensor decoder.layers.2.input_layernorm.weight"):
        from_megatron_core(path, bigger, tmp_path / "back")
    assert not (tmp_path / "back").exists()
