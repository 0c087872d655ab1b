"""Parallel layouts reproduce single-process training: 1F1B on 2 and 4 stages, interleaved 1F1B with 2 chunks per
stage, 2 data-parallel x 2 pipeline ranks, tensor parallelism (with and without sequence parallelism, alone and with
data or pipeline parallelism) give the same per-step losses, gradient norms, validation loss and final parameters
(assembled from the stages and shards) as one process; non-finite steps are skipped on every stage alike;
and the stage balancing is optimal."""
from __future__ import annotations

from itertools import combinations

import pytest
import torch

from megatron_hope.parallel.pipeline import split_blocks
from train_helpers import assert_same_run, run_in_process, run_torchrun, tiny_run_config

RTOL = 1e-5
STEPS = 10
MODEL = ["--model.n_layers=4", f"--train.train_steps={STEPS}"]  # 4 blocks: 2 stages x 2 chunks of one block


def brute_force_cost(costs: list[float], n_chunks: int, last_extra: float) -> float:
    """The smallest costliest chunk over every way to cut `costs` into n_chunks contiguous, non-empty chunks."""
    best = float("inf")
    for cuts in combinations(range(1, len(costs)), n_chunks - 1):
        bounds = [0, *cuts, len(costs)]
        chunk_costs = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
        chunk_costs[-1] += last_extra
        best = min(best, max(chunk_costs))
    return best


@pytest.mark.parametrize("costs, n_chunks, last_extra", [
    ([1.0] * 8, 2, 0.0), ([1.0] * 8, 4, 2.5), ([1.0] * 4, 4, 10.0), ([3.0, 1.0, 1.0, 1.0, 5.0, 2.0, 2.0], 3, 1.0),
    ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 0.0), ([2.0] * 7, 3, 0.5),
])
def test_split_blocks_is_optimal(costs, n_chunks, last_extra):
    ranges = split_blocks(costs, n_chunks, last_extra)
    assert len(ranges) == n_chunks and all(len(r) > 0 for r in ranges)
    assert [i for r in ranges for i in r] == list(range(len(costs)))
    got = [sum(costs[i] for i in r) for r in ranges]
    got[-1] += last_extra
    assert max(got) == brute_force_cost(costs, n_chunks, last_extra)


def test_split_blocks_gives_the_head_stage_fewer_blocks():
    assert split_blocks([1.0] * 8, 2, last_extra=2.0) == [range(0, 5), range(5, 8)]
    with pytest.raises(ValueError, match="cannot cut 2 blocks into 3"):
        split_blocks([1.0, 1.0], 3)


@pytest.fixture(scope="module")
def references(data, tmp_path_factory):
    """(config, micro_batch_size -> the one-process run): 4 blocks, global batch 4 = micro x accumulation, tied
    embeddings, clipping active. The reference has the parallel run's micro-batch size: the micro-batching alone
    moves a few parameters by up to 4e-6 in 10 steps (Adam amplifies rounding where gradients are near zero)."""
    root = tmp_path_factory.mktemp("pipeline")
    config = tiny_run_config(root / "tiny.toml", data, root / "runs")
    runs: dict[int, dict] = {}

    def reference(micro: int) -> dict:
        if micro not in runs:
            runs[micro] = run_in_process(["--config", str(config), *MODEL, f"--train.micro_batch_size={micro}",
                                          f"--train.run_name=ref_mb{micro}"], root / f"ref_mb{micro}.pt")
            losses = [s["loss"] for s in runs[micro]["steps"]]
            assert losses[-1] < losses[0]
        return runs[micro]

    return config, reference


@pytest.mark.parametrize("name, nproc, micro, parallel", [
    ("pp2_1f1b", 2, 2, ["--parallel.pipeline_model_parallel_size=2"]),
    ("pp2_vpp2_interleaved", 2, 2, ["--parallel.pipeline_model_parallel_size=2",
                                    "--parallel.virtual_pipeline_model_parallel_size=2"]),
    # dp 2 x micro 1 x accumulation 2: the same 4 sequences per step, 2 micro-batches through each pipeline
    ("dp2_pp2", 4, 1, ["--parallel.pipeline_model_parallel_size=2"]),
    # middle stages without embedding or head; the tied-embedding pair (ranks 0, 3) is not the pipeline group
    ("pp4_1f1b", 4, 1, ["--parallel.pipeline_model_parallel_size=4"]),
    ("dp2_fsdp2", 2, 2, []),
    # tensor parallelism (heads split), with sequence parallelism, and combined with data and pipeline parallelism
    ("tp2", 2, 2, ["--parallel.tensor_model_parallel_size=2"]),
    ("tp2_sp", 2, 2, ["--parallel.tensor_model_parallel_size=2", "--parallel.sequence_parallel=true"]),
    ("dp2_tp2", 4, 1, ["--parallel.tensor_model_parallel_size=2"]),
    ("pp2_tp2", 4, 2, ["--parallel.tensor_model_parallel_size=2", "--parallel.pipeline_model_parallel_size=2"]),
])
def test_pipeline_matches_one_process(references, tmp_path, name, nproc, micro, parallel):
    config, reference = references
    got = run_torchrun(["--config", str(config), *MODEL, f"--train.micro_batch_size={micro}", *parallel,
                        f"--train.run_name={name}"], tmp_path / f"{name}.pt", nproc=nproc)
    # param atol: a different summation order (TP partial sums, micro-batching) moves parameters whose gradients
    # are near zero by up to ~2e-6 in 10 Adam steps (Adam's normalisation amplifies rounding there)
    assert_same_run(reference(micro), got, steps=STEPS, param_atol=5e-6)


def test_non_finite_steps_are_skipped_on_every_stage(references, tmp_path):
    """A learning rate of 1e30 blows the parameters up in step 1, so that steps 2-4 have NaN losses and gradient
    norms: every stage skips them, as one process does (a stage that stepped would change its parameters)."""
    config, _ = references
    blow_up = ["--config", str(config), "--model.n_layers=4", "--train.train_steps=4", "--optim.lr=1e30",
               "--optim.min_lr=0", "--train.max_nan_steps=10", "--train.eval_batches=0"]
    ref = run_in_process([*blow_up, "--train.run_name=nan_ref"], tmp_path / "nan_ref.pt")
    got = run_torchrun([*blow_up, "--parallel.pipeline_model_parallel_size=2", "--train.run_name=nan_pp2"],
                       tmp_path / "nan_pp2.pt")
    assert [s["skipped"] for s in got["steps"]] == [s["skipped"] for s in ref["steps"]] == [False, True, True, True]
    assert all(s["loss"] != s["loss"] for s in got["steps"][1:])
    assert got["params"].keys() == ref["params"].keys()
    for name, value in ref["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=RTOL, atol=0, msg=lambda m: f"{name}: {m}")
