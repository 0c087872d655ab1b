"""Exact resume: N steps straight equal k steps, a checkpoint, a restart with --resume auto and N - k steps,
bit for bit (losses, gradient norms, learning rates, final parameters), in one process and under FSDP2 with
CMS levels stopped in the middle of their periods."""
from __future__ import annotations

import json

import pytest
import torch

from train_helpers import run_in_process, run_torchrun, tiny_run_config


def assert_identical(straight: dict, resumed_steps: list[dict], resumed: dict) -> None:
    assert [s["loss"] for s in resumed_steps] == [s["loss"] for s in straight["steps"]]
    assert [s["grad_norm"] for s in resumed_steps] == [s["grad_norm"] for s in straight["steps"]]
    assert [s["lr"] for s in resumed_steps] == [s["lr"] for s in straight["steps"]]
    assert resumed["val_loss"] == straight["val_loss"]
    assert resumed["params"].keys() == straight["params"].keys()
    for name, value in straight["params"].items():
        assert torch.equal(resumed["params"][name], value), name


@pytest.mark.parametrize("async_save", [True, False])
def test_resume_single_process_is_bit_identical(data, tmp_path, async_save):
    # periods 1, 2, 4 over 6 steps: stopping after step 3 leaves levels 1 and 2 with pending accumulators
    config = tiny_run_config(tmp_path / "run.toml", data, tmp_path / "runs", periods=(1, 2, 4))
    common = [f"--config={config}", "--train.train_steps=6", f"--checkpoint.async_save={str(async_save).lower()}"]
    straight = run_in_process(common + ["--train.run_name=straight", "--checkpoint.save_final=false"],
                              tmp_path / "straight.pt")
    first = run_in_process(common + ["--train.run_name=split", "--train.stop_at_step=3"], tmp_path / "first.pt")
    assert len(first["steps"]) == 3
    saved = tmp_path / "runs" / "split" / "checkpoints" / "step_00000003"
    assert (saved.parent / "latest").read_text().strip() == saved.name
    pending = torch.load(saved / "rank_00000.pt", weights_only=True)
    assert any(k.startswith("pending.") and ".cms.levels.2." in k for k in pending)  # level 2 (K=4) is mid-period
    assert json.loads((saved / "run_state.json").read_text())["step"] == 3
    second = run_in_process(common + ["--train.run_name=split", "--resume=auto"], tmp_path / "second.pt")
    assert_identical(straight, first["steps"] + second["steps"], second)


@pytest.mark.parametrize("periods,engine", [((1, 2, 4), []),
                                            ((1, 1, 1), ["--parallel.dp_engine=deepspeed", "--parallel.zero_stage=2"])],
                         ids=["fsdp2_cms_periods", "deepspeed_zero2"])
def test_resume_on_two_processes_is_bit_identical(data, tmp_path, periods, engine):
    """dp2: FSDP2 with CMS levels mid-period at the stop (pending accumulators on each rank), and DeepSpeed."""
    config = tiny_run_config(tmp_path / "run.toml", data, tmp_path / "runs", periods=periods)
    common = [f"--config={config}", "--train.train_steps=6", *engine]
    straight = run_torchrun(common + ["--train.run_name=straight", "--checkpoint.save_final=false"],
                            tmp_path / "straight.pt")
    first = run_torchrun(common + ["--train.run_name=split", "--train.stop_at_step=3"], tmp_path / "first.pt")
    second = run_torchrun(common + ["--train.run_name=split", "--resume=auto"], tmp_path / "second.pt")
    assert_identical(straight, first["steps"] + second["steps"], second)


def test_resuming_another_model_is_refused_naming_the_difference(data, tmp_path):
    from checkpoints.errors import CheckpointError

    config = tiny_run_config(tmp_path / "run.toml", data, tmp_path / "runs")
    common = [f"--config={config}", "--train.train_steps=2", "--train.eval_batches=0"]
    run_in_process(common + ["--train.run_name=small"], tmp_path / "small.pt")
    with pytest.raises(CheckpointError, match=r"model.n_layers: 2 saved, 3 now"):
        run_in_process(common + ["--train.run_name=small", "--resume=auto", "--model.n_layers=3"],
                       tmp_path / "big.pt")
