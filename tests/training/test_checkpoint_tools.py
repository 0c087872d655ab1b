"""Checkpoint files and tools: retention, detection of damaged checkpoints (and resuming past them), partial
saves, the safe metadata reader, and `python -m checkpoints` inspect / verify / export / convert."""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoints.__main__ import main as cli
from checkpoints.errors import CheckpointError
from checkpoints.export import load_exported, model_config
from checkpoints.layout import to_delete
from checkpoints.safe_reader import SafeFileSystemReader
from megatron_hope.integrations.megatron_core.weights import from_megatron
from train_helpers import run_in_process, tiny_run_config

STEPS = 7


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A 7-step run saving every step, keeping the last 2 and every 3rd; and its config."""
    root = tmp_path_factory.mktemp("tools")
    config = tiny_run_config(root / "tiny.toml", data, root / "runs")
    argv = [f"--config={config}", f"--train.train_steps={STEPS}", "--train.eval_batches=0",
            "--checkpoint.save_interval=1", "--checkpoint.keep_last=2", "--checkpoint.keep_every=3"]
    result = run_in_process(argv + ["--train.run_name=saved"], root / "saved.pt")
    return argv, result, Path(result["run_dir"]) / "checkpoints"


def test_retention_keeps_the_last_k_and_every_nth(run):
    assert to_delete([1, 2, 3, 4, 5, 6, 7], keep_last=2, keep_every=3, protect=set()) == [1, 2, 4, 5]
    assert to_delete([1, 2, 3], keep_last=1, keep_every=0, protect={2}) == [1]
    assert to_delete([1, 2, 3], keep_last=0, keep_every=0, protect=set()) == []
    _, _, root = run
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000006", "step_00000007"]
    assert (root / "latest").read_text().strip() == "step_00000007"


def damaged_copy(root: Path, tmp_path: Path, damage) -> Path:
    """A copy of the run's newest checkpoint with `damage(directory)` applied."""
    import shutil

    copy = tmp_path / "step_00000007"
    shutil.copytree(root / "step_00000007", copy)
    damage(copy)
    return copy


def flip_byte(directory: Path) -> None:
    shard = next(directory.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def truncate(directory: Path) -> None:
    shard = next(directory.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])


@pytest.mark.parametrize("damage,expected", [(flip_byte, "sha256 differs"), (truncate, "truncated"),
                                             (lambda d: (d / "manifest.json").unlink(), "did not complete")],
                         ids=["corrupted", "truncated", "no_manifest"])
def test_verify_detects_damage(run, tmp_path, capsys, damage, expected):
    _, _, root = run
    assert cli(["verify", str(root / "step_00000007")]) == 0
    assert cli(["verify", str(damaged_copy(root, tmp_path, damage))]) == 1
    assert expected in capsys.readouterr().out


def test_resume_auto_skips_a_corrupted_newest_checkpoint_and_a_partial_save(run, tmp_path):
    argv, saved, root = run
    import shutil

    run_dir = tmp_path / "runs" / "saved"
    shutil.copytree(root.parent, run_dir)
    flip_byte(run_dir / "checkpoints" / "step_00000007")
    (run_dir / "checkpoints" / ".tmp-step_00000008").mkdir()  # a save killed midway
    resumed = run_in_process(argv + [f"--train.runs_dir={tmp_path / 'runs'}", "--train.run_name=saved",
                                     "--resume=auto", f"--train.train_steps={STEPS}"], tmp_path / "resumed.pt")
    log = (run_dir / "train.log").read_text()
    assert "skipping checkpoint" in log and "step_00000007" in log and "sha256 differs" in log
    assert "resumed from" in log and "step_00000006 at step 6" in log
    assert not (run_dir / "checkpoints" / ".tmp-step_00000008").exists()
    assert [s["step"] for s in resumed["steps"]] == [7]
    assert resumed["steps"][0]["loss"] == saved["steps"][6]["loss"]
    for name, value in saved["params"].items():
        assert torch.equal(resumed["params"][name], value), name


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > exploited",))


def test_safe_reader_refuses_foreign_objects_without_running_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError, match="refers to (posix|os).system"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()
    assert not (tmp_path / "exploited").exists()
    buffer = io.BytesIO()
    pickle.dump({"not": "metadata"}, buffer)
    (tmp_path / ".metadata").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="not checkpoint metadata"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()


def test_export_loads_into_hopelm_with_the_trained_parameters(run, tmp_path, capsys):
    _, saved, root = run
    assert cli(["inspect", str(root.parent)]) == 0
    assert "step_00000007" in capsys.readouterr().out
    assert cli(["inspect", str(root / "step_00000007")]) == 0
    assert "step: 7 |" in capsys.readouterr().out
    assert cli(["export", str(root / "step_00000007"), "--out", str(tmp_path / "export")]) == 0
    model = load_exported(tmp_path / "export")
    state = model.state_dict()
    assert state.keys() == saved["params"].keys()
    for name, value in saved["params"].items():
        assert torch.equal(state[name], value), name


def test_convert_to_megatron_core_round_trips(run, tmp_path):
    _, saved, root = run
    assert cli(["convert", str(root / "step_00000007"), "--to", "megatron-core", "--tp", "2",
                "--out", str(tmp_path / "mcore.safetensors")]) == 0
    ranks = [load_file(str(tmp_path / f"mcore_tp{r}.safetensors")) for r in range(2)]
    native = from_megatron(ranks, model_config(root / "step_00000007"))
    assert native.keys() == saved["params"].keys()
    for name, value in saved["params"].items():
        assert torch.equal(native[name], value), name


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert cli(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli(["verify", str(tmp_path)]) == 1
    assert "is not a checkpoint" in capsys.readouterr().err
