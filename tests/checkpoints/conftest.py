"""A real run that saved a checkpoint after every step (retention on), shared by the checkpoint tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from checkpoint_helpers import STEPS, SavedRun
from train_helpers import run_in_process, tiny_run_config


@pytest.fixture(scope="session")
def run(data, tmp_path_factory) -> SavedRun:
    """hope_tiny for STEPS steps, a checkpoint after each, keeping the last 2 and every 2nd."""
    root = tmp_path_factory.mktemp("checkpoints")
    config = tiny_run_config(root / "tiny.toml", data, root / "runs")
    argv = [f"--config={config}", f"--train.train_steps={STEPS}", "--train.eval_batches=0",
            "--checkpoint.save_interval=1", "--checkpoint.keep_last=2", "--checkpoint.keep_every=2"]
    result = run_in_process(argv + ["--train.run_name=saved"], root / "saved.pt")
    return SavedRun(argv, config, result, Path(result["run_dir"]) / "checkpoints")
