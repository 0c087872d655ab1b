"""`python -m checkpoints inspect|verify|export|convert`: exit codes, the key lines of their output, and one-line
errors that name the problem and the fix."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from checkpoint_helpers import STEPS, damaged_copy, flip_byte, truncate
from checkpoints.__main__ import main as cli
from checkpoints.export import load_exported
from checkpoints.layout import step_name
from megatron_hope.config import load
from megatron_hope.model.summary import count_parameters
from train_helpers import REPO


def run_cli(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = cli([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_inspect_a_run_lists_its_checkpoints(run, capsys):
    for path in (run.root.parent, run.root):
        code, out, _ = run_cli(capsys, "inspect", path)
        assert code == 0
        rows = [line.split() for line in out[1:-1]]
        assert [int(r[0]) for r in rows] == [STEPS, 4, 2]
        assert all(r[2] == "complete" for r in rows) and rows[0][3:] == ["<-", "latest"] and len(rows[1]) == 3
        size = sum(p.stat().st_size for p in run.newest.iterdir())
        assert float(rows[0][1]) == pytest.approx(size / 2**20, abs=0.01)
        assert out[-1] == f"latest: {step_name(STEPS)}"


def test_inspect_a_run_shows_damaged_checkpoints_and_partial_saves(run, tmp_path, capsys):
    root = tmp_path / "checkpoints"
    shutil.copytree(run.root, root)
    name = truncate(root / step_name(STEPS))
    (root / f".tmp-{step_name(STEPS + 1)}").mkdir()
    code, out, _ = run_cli(capsys, "inspect", root)
    assert code == 0
    newest, previous = out[1].split(), out[2].split()
    assert (newest[0], newest[2], previous[0], previous[2]) == (str(STEPS), "INVALID:", str(STEPS - 1), "complete")
    assert f"{name}: " in out[1] and "(truncated?)" in out[1] and out[1].endswith("<- latest")
    assert out[-2:] == [f"partial save .tmp-{step_name(STEPS + 1)}: never resumed from; `--resume auto` removes it",
                        f"latest: {step_name(STEPS)}"]


def test_inspect_a_checkpoint(run, capsys):
    code, out, _ = run_cli(capsys, "inspect", run.newest)
    assert code == 0
    cfg = load(str(run.config))
    lines = dict(line.split(": ", 1) for line in out if ": " in line and not line.startswith(" "))
    assert lines["step"] == str(STEPS)
    assert lines["consumed tokens"] == f"{STEPS * cfg.train.global_batch_size * cfg.train.seq_len:,}"
    assert lines["saved by"] == "1 rank(s): tp 1 x pp 1 x dp 1 (fsdp2)"
    assert lines["model"].startswith(f"hope, {count_parameters(cfg.model)['total']:,} parameters, d_model 64")
    assert lines["bytes"].startswith(f"{sum(p.stat().st_size for p in run.newest.iterdir()):,} ")
    assert lines["files"].startswith("complete")
    assert lines["model tensors"] == str(len(run.params))
    tensors = {parts[0]: parts[1:] for parts in (line.split(maxsplit=1) for line in out if line.startswith("  "))}
    assert tensors.keys() == run.params.keys()
    for name, value in run.params.items():
        assert tensors[name][0].split() == [*str(tuple(value.shape)).split(), "float32"], name
    n = len(run.params) - 1  # AdamW's state is per parameter: the tied head is the embedding
    assert lines["optimizer state"] == f"exp_avg x {n}, exp_avg_sq x {n}, step x {n}"


def test_export_and_convert(run, tmp_path, capsys):
    assert run_cli(capsys, "export", run.newest, "--out", tmp_path / "export")[:2] == (
        0, [f"wrote {tmp_path / 'export' / 'model.safetensors'}"])
    assert run_cli(capsys, "convert", run.newest, "--to", "megatron-core", "--tp", "2",
                   "--out", tmp_path / "mcore.safetensors")[:2] == (
        0, [f"wrote {tmp_path / f'mcore_tp{r}.safetensors'}" for r in range(2)])
    assert run_cli(capsys, "convert", tmp_path / "mcore.safetensors", "--from", "megatron-core",
                   "--config", run.newest / "config.toml", "--out", tmp_path / "back")[:2] == (
        0, [f"wrote {tmp_path / 'back' / 'model.safetensors'}"])
    exported, back = load_exported(tmp_path / "export").state_dict(), load_exported(tmp_path / "back").state_dict()
    for name, value in run.params.items():
        assert torch.equal(exported[name], value) and torch.equal(back[name], value), name


def test_errors_name_the_problem_and_the_fix(run, tmp_path, capsys):
    missing = tmp_path / "missing"
    for command in (["inspect", missing], ["verify", missing], ["export", missing, "--out", tmp_path / "x"],
                    ["convert", missing, "--to", "megatron-core", "--out", tmp_path / "x.safetensors"]):
        code, out, err = run_cli(capsys, *command)
        assert (code, out, err) == (1, [], f"error: {missing} does not exist; give "
                                           "runs/NAME/checkpoints/step_NNNNNNNN\n"), command
    code, _, err = run_cli(capsys, "verify", tmp_path)
    assert code == 1 and f"{tmp_path} is not a checkpoint (no manifest.json or run_state.json)" in err
    code, _, err = run_cli(capsys, "export", run.root.parent, "--out", tmp_path / "x")
    assert code == 1 and "is a run's checkpoint directory, not one checkpoint" in err
    assert f"{run.newest} (latest)" in err
    copy, shard = damaged_copy(run.newest, tmp_path / "damaged", flip_byte)
    for command in (["export", copy, "--out", tmp_path / "x"],
                    ["convert", copy, "--to", "megatron-core", "--out", tmp_path / "x.safetensors"]):
        code, out, err = run_cli(capsys, *command)
        assert code == 1 and out == [] and f"{shard}: sha256 differs" in err and "is not usable" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.safetensors").exists()
    code, _, err = run_cli(capsys, "convert", run.newest, "--to", "megatron-core", "--tp", "3", "--out", tmp_path / "y")
    assert code == 1 and "--tp 3 does not divide model.n_heads = 4" in err
    code, _, err = run_cli(capsys, "convert", tmp_path / "y", "--from", "megatron-core", "--out", tmp_path / "z")
    assert code == 1 and "needs --config" in err


def test_the_module_runs_and_fails_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "checkpoints", "verify", str(tmp_path / "missing")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines()[-1] == f"error: {tmp_path / 'missing'} does not exist; give " \
                                           "runs/NAME/checkpoints/step_NNNNNNNN"
    assert "Traceback" not in proc.stderr


def test_out_never_overwrites_other_files(run, tmp_path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    mcore, config = tmp_path / "mcore.safetensors", run.newest / "config.toml"
    assert run_cli(capsys, "convert", run.newest, "--to", "megatron-core", "--out", mcore)[0] == 0
    a_file = f"error: --out {mine} is a file; give a directory for the export (a new one, an empty one or an " \
             "earlier export's)\n"
    a_folder = f"error: --out {folder} holds other files than an export's (notes.txt); give a new or empty " \
               "directory, or an earlier export's\n"
    for argv, err in [(["export", run.newest, "--out", mine], a_file),
                      (["export", run.newest, "--out", folder], a_folder),
                      (["convert", mcore, "--from", "megatron-core", "--config", config, "--out", mine], a_file),
                      (["convert", mcore, "--from", "megatron-core", "--config", config, "--out", folder], a_folder),
                      (["convert", run.newest, "--to", "megatron-core", "--out", folder],
                       f"error: {folder} is a directory; give --out the path of a .safetensors file to write\n"),
                      (["convert", run.newest, "--to", "megatron-core", "--out", mine],
                       f"error: {mine} exists and is not a safetensors file; give --out a new path (an earlier "
                       "conversion's is replaced)\n"),
                      (["export", run.newest, "--out", mine / "sub"], f"error: [Errno 20] Not a directory: "
                                                                      f"'{mine / 'sub'}'\n")]:
        assert run_cli(capsys, *argv) == (1, [], err), argv
    assert mine.read_text() == (folder / "notes.txt").read_text() == "mine"
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_an_earlier_export_or_conversion_is_replaced(run, tmp_path, capsys):
    for argv in (["export", run.newest, "--out", tmp_path / "export"],
                 ["convert", run.newest, "--to", "megatron-core", "--out", tmp_path / "mcore.safetensors"],
                 ["convert", tmp_path / "mcore.safetensors", "--from", "megatron-core",
                  "--config", run.newest / "config.toml", "--out", tmp_path / "export"]):
        assert run_cli(capsys, *argv)[0] == run_cli(capsys, *argv)[0] == 0, argv
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.toml", "model.safetensors"]
