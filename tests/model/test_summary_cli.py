"""`python -m megatron_hope.model.summary`: a config error or a sequence length below 1 is one `error:` line and
exit status 2 (the config errors' convention), never a traceback or a count for a length that cannot be."""
from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_hope.model.summary import main
from train_helpers import REPO

TINY = str(REPO / "configs" / "hope_tiny.toml")


@pytest.mark.parametrize("seq_len", [-5, 0])
def test_a_sequence_length_below_one_is_refused(capsys, seq_len):
    assert main(["--config", TINY, "--seq-len", str(seq_len)]) == 2
    assert capsys.readouterr() == ("", f"error: --seq-len {seq_len}: the sequence length must be at least 1 (or "
                                       "leave it out for model.max_seq_len, 64)\n")


def test_config_errors_are_one_line(tmp_path, capsys):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[model\n")
    for argv, err in [(["--config", str(tmp_path / "missing.toml")],
                       f"config file {tmp_path / 'missing.toml'} does not exist; pass --config with a path to a "
                       "TOML file"),
                      (["--config", TINY, "--model.d_model=abc"], "model.d_model must be an integer, got 'abc'"),
                      (["--config", TINY, "--model.nosuch=1"], "override --model.nosuch: no field 'nosuch' in "
                                                               "ModelConfig"),
                      (["--config", str(bad_toml)], f"config file {bad_toml} is not valid TOML: ")]:
        assert main(argv) == 2, argv
        out, got = capsys.readouterr()
        assert out == "" and got.startswith(f"error: {err}") and got.count("\n") == 1, got


def test_the_module_exits_2_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "megatron_hope.model.summary", "--config", TINY, "--seq-len", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.splitlines()[-1].startswith("error: --seq-len 0: ") and "Traceback" not in proc.stderr
