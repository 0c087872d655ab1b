"""Resharding on load: a checkpoint saved in one parallel layout resumes in another with no offline step, and
the following steps reproduce the single-process run within fp32 tolerance (the layouts' golden tolerance)."""
from __future__ import annotations

import pytest

from train_helpers import assert_same_run, run_in_process, run_torchrun, tiny_run_config

STEPS, STOP = 4, 2
TP2_PP2 = ["--parallel.tensor_model_parallel_size=2", "--parallel.pipeline_model_parallel_size=2"]


def resumed_tail(ref: dict) -> dict:
    return {**ref, "steps": ref["steps"][STOP:]}


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory):
    """The single-process reference of STEPS steps, and a checkpoint after step STOP of the same run at tp2 x pp2
    (micro-batches of 1 sequence so that dp 4 can take the global batch of 4)."""
    root = tmp_path_factory.mktemp("reshard")
    config = tiny_run_config(root / "tiny.toml", data, root / "runs")
    common = ["--config", str(config), f"--train.train_steps={STEPS}", "--train.micro_batch_size=1"]
    ref = run_in_process(common + ["--train.run_name=ref", "--checkpoint.save_final=false"], root / "ref.pt")
    run_torchrun(common + TP2_PP2 + ["--train.run_name=tp2pp2", f"--train.stop_at_step={STOP}"],
                 root / "tp2pp2.pt", nproc=4)
    return common, ref, root / "runs" / "tp2pp2" / "checkpoints" / f"step_{STOP:08d}"


@pytest.mark.parametrize("layout,nproc", [([], 4),
                                          (["--parallel.pipeline_model_parallel_size=2"], 2),
                                          (["--parallel.tensor_model_parallel_size=2"], 2),
                                          ([], 1)], ids=["dp4", "pp2", "tp2", "one_process"])
def test_tp2_pp2_checkpoint_resumes_in_another_layout(saved, tmp_path, layout, nproc):
    common, ref, checkpoint = saved
    argv = common + layout + [f"--train.runs_dir={tmp_path}/runs", "--train.run_name=from_tp2pp2",
                              f"--resume={checkpoint}"]
    got = (run_torchrun(argv, tmp_path / "got.pt", nproc=nproc) if nproc > 1
           else run_in_process(argv, tmp_path / "got.pt"))
    assert [s["step"] for s in got["steps"]] == list(range(STOP + 1, STEPS + 1))
    assert_same_run(resumed_tail(ref), got, steps=STEPS - STOP, param_atol=5e-6)


def test_dp2_checkpoint_with_pending_cms_gradients_resumes_at_dp4(data, tmp_path):
    """CMS periods (1, 2, 4) stopped after step 3: levels 1 and 2 hold local gradient sums on each of the 2
    ranks; at dp 4 every rank starts from their mean, so the next reductions give the same gradients."""
    config = tiny_run_config(tmp_path / "tiny.toml", data, tmp_path / "runs", periods=(1, 2, 4))
    common = ["--config", str(config), f"--train.train_steps={STEPS + 1}", "--train.micro_batch_size=1"]
    ref = run_in_process(common + ["--train.run_name=ref", "--checkpoint.save_final=false"], tmp_path / "ref.pt")
    run_torchrun(common + ["--train.run_name=dp2", "--train.stop_at_step=3"], tmp_path / "dp2.pt")
    got = run_torchrun(common + ["--train.run_name=dp4", f"--resume={tmp_path}/runs/dp2/checkpoints/step_00000003"],
                       tmp_path / "dp4.pt", nproc=4)
    assert_same_run({**ref, "steps": ref["steps"][3:]}, got, steps=STEPS + 1 - 3, param_atol=5e-6)


@pytest.mark.parametrize("save_engine,load_engine", [("fsdp2", "deepspeed"), ("deepspeed", "fsdp2")])
def test_checkpoint_converts_between_fsdp2_and_deepspeed(saved, tmp_path, save_engine, load_engine):
    """Both engines save and load the same full-name tensors, so a dp2 checkpoint of one resumes in the other."""
    common, ref, _ = saved
    common = common + [f"--train.runs_dir={tmp_path}/runs"]
    run_torchrun(common + [f"--parallel.dp_engine={save_engine}", "--train.run_name=first",
                           f"--train.stop_at_step={STOP}"], tmp_path / "first.pt")
    got = run_torchrun(common + [f"--parallel.dp_engine={load_engine}", "--train.run_name=second",
                                 f"--resume={tmp_path}/runs/first/checkpoints/step_{STOP:08d}"], tmp_path / "got.pt")
    assert_same_run(resumed_tail(ref), got, steps=STEPS - STOP, param_atol=5e-6)
