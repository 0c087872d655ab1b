"""Damaged and partial checkpoints: verify names every problem; `--resume auto` skips a corrupted newest
checkpoint and resumes exactly from the one before; a partial save (.tmp-step_*) is never used and is removed."""
from __future__ import annotations

import shutil

import pytest
import torch

from checkpoint_helpers import STEPS, damaged_copy, delete_manifest, flip_byte, shard, truncate
from checkpoints.__main__ import main as cli
from checkpoints.layout import step_dirs, step_name
from checkpoints.manifest import problems
from train_helpers import run_in_process


@pytest.mark.parametrize("damage,expected", [(flip_byte, "{}: sha256 differs from the manifest (corrupted)"),
                                             (truncate, "{}: {} bytes, the manifest says {} (truncated?)"),
                                             (delete_manifest, "has no {}: the save did not complete")],
                         ids=["corrupted", "truncated", "no_manifest"])
def test_verify_names_the_damage(run, tmp_path, capsys, damage, expected):
    assert cli(["verify", str(run.newest)]) == 0
    assert capsys.readouterr().out.strip() == f"{run.newest}: ok"
    size = shard(run.newest).stat().st_size
    copy, name = damaged_copy(run.newest, tmp_path, damage)
    assert cli(["verify", str(copy)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"{copy}: INVALID"
    assert len(out) == 2 and expected.format(name, size - 100, size) in out[0]


def test_sizes_only_check_misses_a_flipped_byte_but_not_a_truncation(run, tmp_path):
    flipped, _ = damaged_copy(run.newest, tmp_path / "flipped", flip_byte)
    truncated, name = damaged_copy(run.newest, tmp_path / "truncated", truncate)
    assert problems(flipped, checksums=False) == []
    assert len(problems(truncated, checksums=False)) == 1 and name in problems(truncated, checksums=False)[0]


def test_resume_auto_skips_a_corrupted_newest_checkpoint_and_a_partial_save(run, tmp_path):
    run_dir = tmp_path / "runs" / "saved"
    shutil.copytree(run.root.parent, run_dir)
    root = run_dir / "checkpoints"
    partial = root / f".tmp-{step_name(STEPS + 1)}"  # a save killed before its rename: complete-looking files
    shutil.copytree(root / step_name(STEPS), partial)
    corrupted = flip_byte(root / step_name(STEPS))
    assert [p.name for p in step_dirs(root)][0] == step_name(STEPS)  # partial saves are not checkpoints

    resumed = run_in_process(run.argv + [f"--train.runs_dir={tmp_path / 'runs'}", "--train.run_name=saved",
                                         "--resume=auto"], tmp_path / "resumed.pt")
    log = (run_dir / "train.log").read_text()
    assert f"skipping checkpoint {root / step_name(STEPS)}: {corrupted}: sha256 differs" in log
    assert f"removed {partial.name}: a save that did not complete" in log
    assert f"resumed from {root / step_name(STEPS - 1)} at step {STEPS - 1}" in log
    assert not partial.exists()
    straight = run.result["steps"]
    assert [s["step"] for s in resumed["steps"]] == [straight[-1]["step"]] == [STEPS]
    assert resumed["steps"][0]["loss"] == straight[-1]["loss"]
    assert resumed["params"].keys() == run.params.keys()
    for name, value in run.params.items():
        assert torch.equal(resumed["params"][name], value), name
