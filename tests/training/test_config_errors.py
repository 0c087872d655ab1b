"""Invalid run configurations are rejected by launch.train before any process group starts, with a message
naming the field."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from data_pipeline.tokenizer import train_tokenizer
from launch.env import ProcessEnv
from launch.train import prepare
from megatron_hope.config_base import ConfigError
from train_helpers import REPO, make_documents, tiny_run_config

TWO_RANKS = ProcessEnv(rank=0, world_size=2, local_rank=0)


@pytest.fixture(scope="module")
def config(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_configs")
    return tiny_run_config(root / "tiny.toml", data, root / "runs")


def test_the_base_config_is_valid(config):
    run = prepare(["--config", str(config)], TWO_RANKS)
    assert run.cfg.parallel.data_parallel_size == 2 and run.cfg.grad_accum_steps(2) == 1
    assert run.device.type == "cpu"
    assert not run.run_dir.exists()  # nothing is written before the run starts


@pytest.mark.parametrize("overrides, message", [
    (["--train.global_batch_size=6"], r"train\.global_batch_size = 6 is not a multiple of train\.micro_batch_size x "
                                      r"data_parallel_size = 2 x 2"),
    (["--train.global_batch_size=5"], r"train\.global_batch_size = 5 is not a multiple of train\.micro_batch_size"),
    (["--train.micro_batch_size=0"], r"train\.micro_batch_size = 0 must be >= 1"),
    (["--train.seq_len=128"], r"train\.seq_len = 128 exceeds model\.max_seq_len = 64"),
    (["--train.seq_len=abc"], r"train\.seq_len must be an integer"),
    (["--train.max_nan_steps=0"], r"train\.max_nan_steps = 0 must be >= 1"),
    (["--train.eval_interval=-1"], r"train\.eval_interval = -1 must be >= 0"),
    (["--train.global_batch_size=4000"], r"train\.global_batch_size 4000 x train\.seq_len 64"),
    (["--train.steps=10"], r"no field 'steps' in TrainConfig"),
    (["--optim.warmup_steps=6"], r"optim\.warmup_steps = 6 must be in \[0, train\.train_steps = 5\]"),
    (["--optim.schedule=step"], r"optim\.schedule = 'step' is not allowed"),
    (["--optim.lr=0"], r"optim\.lr = 0\.0 must be > 0"),
    (["--optim.min_lr=0.1"], r"optim\.min_lr = 0\.1 must be in \[0, optim\.lr"),
    (["--optim.betas=[0.9, 1.5]"], r"optim\.betas\[1\] = 1\.5 must be in \[0, 1\)"),
    (["--optim.grad_clip=-1"], r"optim\.grad_clip = -1\.0 must be >= 0"),
    (["--optim.schedule=wsd", "--optim.decay_fraction=0"], r"optim\.decay_fraction = 0\.0 must be in \(0, 1\]"),
    (["--optim.schedule=wsd", "--optim.decay_fraction=0.8"], r"optim\.warmup_steps \+ decay_fraction"),
    (["--data.train_manifest=does/not/exist/manifest.json"], r"data\.train_manifest = 'does/not/exist/manifest\.json' "
                                                            r"does not exist"),
    (["--data.train_manifest="], r"data\.train_manifest is empty"),
    (["--data.val_manifest="], r"data\.val_manifest is empty"),
    (["--data.num_workers=-1"], r"data\.num_workers = -1 must be >= 0"),
    (["--parallel.data_parallel_size=4"], r"parallel\.data_parallel_size = 4 but 2 process\(es\)"),
    (["--parallel.dp_engine=ddp"], r"parallel\.dp_engine = 'ddp' is not allowed"),
    (["--parallel.dp_engine=deepspeed", "--parallel.zero_stage=3"],
     r"parallel\.zero_stage = 3: the DeepSpeed engine runs ZeRO stage 1 or 2"),
    (["--parallel.dp_engine=deepspeed", "--parallel.tensor_model_parallel_size=2"],
     r"parallel\.dp_engine = \"deepspeed\" supports data parallelism only; set parallel\.tensor_model_parallel_size"),
    (["--parallel.pipeline_model_parallel_size=3"], r"2 process\(es\) are not a multiple of parallel\.tensor_model_"
                                                    r"parallel_size x parallel\.pipeline_model_parallel_size = 3"),
    (["--parallel.virtual_pipeline_model_parallel_size=2"], r"parallel\.virtual_pipeline_model_parallel_size > 1 "
                                                            r"needs parallel\.pipeline_model_parallel_size > 1"),
    (["--parallel.pipeline_model_parallel_size=2", "--parallel.virtual_pipeline_model_parallel_size=2"],
     r"pipeline stages x virtual chunks = 4 exceed model\.n_layers = 2"),
    (["--parallel.pipeline_model_parallel_size=2", "--train.global_batch_size=2"],
     r"parallel\.pipeline_model_parallel_size = 2 needs at least 2 micro-batches per step, but train\.global_batch_"
     r"size / \(train\.micro_batch_size x data_parallel_size\) = 1"),
    (["--parallel.pipeline_model_parallel_size=2", "--parallel.virtual_pipeline_model_parallel_size=2",
      "--model.n_layers=4", "--train.global_batch_size=10"],
     r"parallel\.virtual_pipeline_model_parallel_size > 1 \(interleaved 1F1B\) runs the micro-batches in 5 // "
     r"parallel\.pipeline_model_parallel_size = 2 equal rounds"),
    (["--model.vocab_size=300"], r"model\.vocab_size = 300 is smaller than the tokenizer's vocabulary \(320"),
    (["--model.cms.inner_updates=true"], r"model\.cms\.inner_updates = true is not wired into the trainer yet"),
    (["--train.device=tpu"], r"train\.device = 'tpu' is not allowed"),
    (["--optim.lr=inf"], r"optim\.lr must be a finite number, got inf"),
    (["--optim.lr=nan"], r"optim\.lr must be a finite number, got nan"),
    (["--optim.grad_clip=nan"], r"optim\.grad_clip must be a finite number, got nan"),
    (["--model.init_std=inf"], r"model\.init_std must be a finite number, got inf"),
    (["--model.memory.eta_max=-inf"], r"model\.memory\.eta_max must be a finite number, got -inf"),
    (["--model.norm_eps=-1e-6"], r"model\.norm_eps = -1e-06 must be > 0"),
    (["--model.rope_theta=0"], r"model\.rope_theta = 0\.0 must be > 0"),
    (["--train.stop_at_step=6"], r"train\.stop_at_step = 6 is beyond train\.train_steps = 5"),
    (["--train.run_name=a/b"], r"train\.run_name = 'a/b' holds a '/'"),
    (["--train.run_name= lead"], r"train\.run_name = ' lead' starts or ends with a space"),
    (["--checkpoint.resume=nowhere"], r"checkpoint\.resume = 'nowhere' is neither \"auto\", \"none\" nor a "
                                      r"checkpoint directory"),
])
def test_invalid_config_is_rejected_before_any_process_group(config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        prepare(["--config", str(config), *overrides], TWO_RANKS)
    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_rejected(config):
    with pytest.raises(ConfigError, match=r"train\.device = 'cuda' but CUDA is not available"):
        prepare(["--config", str(config), "--train.device=cuda"], TWO_RANKS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_triton_kernels_on_a_cpu_are_rejected(config, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the suite interprets kernels; a user's run does not
    with pytest.raises(ConfigError, match=r"model\.memory\.impl = 'triton' runs on CUDA and this run is on cpu"):
        prepare(["--config", str(config), "--train.device=cpu", "--model.memory.impl=triton"], TWO_RANKS)


def test_manifest_path_must_be_a_manifest(config, data):
    card = data["tokenizer"] / "card.json"
    with pytest.raises(ConfigError, match=r"data\.train_manifest = .*card\.json' is not a manifest\.json"):
        prepare(["--config", str(config), f"--data.train_manifest={card}"], TWO_RANKS)


def test_shards_of_another_tokenizer_are_rejected(config, tmp_path):
    (tmp_path / "corpus.txt").write_text("\n".join(make_documents(40, seed=9)))
    train_tokenizer([tmp_path / "corpus.txt"], tmp_path / "tok", vocab_size=300, threads=1)
    with pytest.raises(ConfigError, match=r"data\.train_manifest was prepared with a different tokenizer"):
        prepare(["--config", str(config), f"--data.tokenizer_dir={tmp_path / 'tok'}"], TWO_RANKS)


def test_existing_run_name_is_rejected(config, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match=r"train\.run_name: .*taken already exists"):
        prepare(["--config", str(config), f"--train.runs_dir={tmp_path}", "--train.run_name=taken"], TWO_RANKS)


def test_command_line_reports_the_field_and_exits_2(config):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "launch.train", "--config", str(config), "--optim.lr=-1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: optim.lr = -1.0 must be > 0"


def test_process_environment_is_read_from_torchrun_variables():
    assert ProcessEnv.from_environ({}) == ProcessEnv(0, 1, 0)
    assert ProcessEnv.from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == ProcessEnv(3, 4, 1)
    with pytest.raises(ConfigError, match=r"sets \['RANK'\] but not \['LOCAL_RANK', 'WORLD_SIZE'\]"):
        ProcessEnv.from_environ({"RANK": "0"})
    with pytest.raises(ConfigError, match=r"RANK = 4 is outside 0\.\.WORLD_SIZE-1 = 3"):
        ProcessEnv.from_environ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
