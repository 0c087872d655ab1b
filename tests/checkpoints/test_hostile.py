"""A checkpoint whose .metadata carries a payload, with its manifest written again (as anyone who can write the
checkpoint can): no tool and no resume runs the payload; each refuses the checkpoint with one line that names
the file and what it asks for."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import Metadata

from checkpoint_helpers import STEPS, MakesDirectory, call_opcodes, plant
from checkpoints.__main__ import main as cli
from checkpoints.layout import step_name
from train_helpers import REPO

REFUSAL = "the pickle {}, which DCP metadata never does; not loaded: the file is damaged or crafted (use a trusted " \
          "copy of the checkpoint)"


@dataclass
class Hostile:
    run_dir: Path  # a copy of the saved run, its newest checkpoint planted
    checkpoint: Path
    marker: Path  # what the payload creates when it runs
    problem: str  # the reader's refusal


@pytest.fixture(params=["torch_save_to_dcp", "os_through_a_dcp_module"])
def hostile(request, run, tmp_path) -> Hostile:
    marker = tmp_path / "payload-ran"
    run_dir = tmp_path / "runs" / "saved"
    shutil.copytree(run.root.parent, run_dir)
    checkpoint = run_dir / "checkpoints" / step_name(STEPS)
    if request.param == "torch_save_to_dcp":  # DCP's converter: torch.load(weights_only=False) of a named file
        torch.save({"state": MakesDirectory(marker)}, tmp_path / "payload.pt")
        target = ("torch.distributed.checkpoint.format_utils", "torch_save_to_dcp")
        plant(checkpoint, call_opcodes(*target, str(tmp_path / "payload.pt"), str(tmp_path / "converted")))
    else:  # os.mkdir, named as an attribute of a DCP module
        target = ("torch.distributed.checkpoint.metadata", "os.mkdir")
        plant(checkpoint, call_opcodes(*target, str(marker)))
    return Hostile(run_dir, checkpoint, marker, REFUSAL.format(f"refers to {'.'.join(target)}"))


def test_the_payload_is_live(hostile):
    """pickle.load (what DCP's own reader does) runs it, and still returns DCP metadata: the other tests can fail."""
    assert isinstance(pickle.loads((hostile.checkpoint / ".metadata").read_bytes()), Metadata)
    assert hostile.marker.is_dir()


def run_cli(capsys, *argv: object) -> tuple[int, list[str], str]:
    code = cli([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_every_command_refuses_it_without_running_it(hostile, tmp_path, capsys):
    ck = hostile.checkpoint
    export, mcore = tmp_path / "export", tmp_path / "m.safetensors"
    results = {name: run_cli(capsys, *argv) for name, argv in {
        "verify": ["verify", ck], "verify no sha256": ["verify", ck, "--no-checksums"], "inspect": ["inspect", ck],
        "export": ["export", ck, "--out", export], "convert": ["convert", ck, "--to", "megatron-core", "--out", mcore],
        "inspect run": ["inspect", hostile.run_dir]}.items()}
    assert not hostile.marker.exists()
    assert results["verify"] == (1, [f"{ck}: .metadata: {hostile.problem}", f"{ck}: INVALID"], "")
    assert results["verify no sha256"] == (1, [f"{ck}: .metadata: {hostile.problem}", f"{ck}: INVALID (no sha256)"],
                                           "")
    assert results["inspect"] == (1, [], f"error: {ck / '.metadata'}: {hostile.problem}\n")
    not_usable = f"error: checkpoint {ck} is not usable: .metadata: {hostile.problem}\n"
    assert results["export"] == results["convert"] == (1, [], not_usable)
    assert not export.exists() and not mcore.exists()
    code, out, err = results["inspect run"]  # a listing: the checkpoint's row says what is wrong with it
    assert (code, err) == (0, "") and out[1].split()[0] == str(STEPS)
    assert out[1].endswith(f"  INVALID: .metadata: {hostile.problem}  <- latest")


def test_resuming_from_it_refuses_it_without_running_it(hostile, run, tmp_path):
    cmd = [sys.executable, "-m", "launch.train", *run.argv, f"--train.runs_dir={tmp_path / 'runs'}",
           "--train.run_name=resumed", f"--resume={hostile.checkpoint}"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert not hostile.marker.exists()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == f"error: checkpoint.resume = {hostile.checkpoint}: .metadata: " \
                                           f"{hostile.problem}"
