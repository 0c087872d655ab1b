"""Exact resume: same DP size, a different DP size (2 -> 3 ranks), other worker counts, across epochs."""
from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.dataset import LoaderConfig, PackedTokenDataset
from data_pipeline.errors import DataPipelineError
from data_helpers import take, windows

SEQ = 16


def config(data_dir, **kw) -> LoaderConfig:
    return LoaderConfig(str(data_dir), **{"seq_len": SEQ, "micro_batch": 2, "shuffle_buffer": 8, **kw})


def ranks(data_dir, dp_size: int, state=None, **kw) -> list[PackedTokenDataset]:
    out = [PackedTokenDataset(config(data_dir, **kw), r, dp_size) for r in range(dp_size)]
    for ds in out:
        if state is not None:
            ds.load_state_dict(state)
    return out


def global_steps(datasets: list[PackedTokenDataset], steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Run every rank `steps` steps; concatenate what the ranks yield per step, in rank order."""
    per_rank = [take(ds, steps) for ds in datasets]
    assert all(len(r) == steps for r in per_rank)
    ordered = [per_rank[r][s] for s in range(steps) for r in range(len(datasets))]
    return windows(ordered)


def assert_same(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_resume_at_same_dp_size_is_bit_identical(data_dir):
    reference = global_steps(ranks(data_dir, 2), 12)
    first = ranks(data_dir, 2)
    head = global_steps(first, 5)
    state = first[0].state_dict()
    assert state == first[1].state_dict() and state["consumed_samples"] == 5 * 2 * 2
    tail = global_steps(ranks(data_dir, 2, state), 7)
    assert_same(reference, (np.concatenate([head[0], tail[0]]), np.concatenate([head[1], tail[1]])))


def test_resume_on_three_ranks_after_two_continues_the_global_stream(data_dir):
    # The global stream: every sample of the epoch, in order, from one rank taking one sample per step.
    stream = windows(take(PackedTokenDataset(config(data_dir, micro_batch=1, loop=False))))
    two = ranks(data_dir, 2)
    head = global_steps(two, 4)  # 4 steps x 2 ranks x 2 samples
    three = ranks(data_dir, 3, two[0].state_dict())
    tail = global_steps(three, 5)  # 5 steps x 3 ranks x 2 samples
    assert_same(head, (stream[0][:16], stream[1][:16]))
    assert_same(tail, (stream[0][16:46], stream[1][16:46]))
    assert three[0].state_dict()["consumed_samples"] == 46


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_worker_counts_give_the_same_batches_and_resume_exactly(data_dir):
    reference = take(PackedTokenDataset(config(data_dir, loop=False)))
    with_workers = take(PackedTokenDataset(config(data_dir, loop=False)).loader(num_workers=2))
    assert_same(windows(reference), windows(with_workers))

    interrupted = PackedTokenDataset(config(data_dir, loop=False))
    head = take(interrupted.loader(num_workers=2), 7)  # workers ran ahead; only 7 batches were delivered
    assert interrupted.state_dict()["consumed_samples"] == 7 * 2
    resumed = PackedTokenDataset(config(data_dir, loop=False))
    resumed.load_state_dict(interrupted.state_dict())
    middle = take(resumed, 5)  # no workers
    again = PackedTokenDataset(config(data_dir, loop=False))
    again.load_state_dict(resumed.state_dict())
    tail = take(again.loader(num_workers=3))
    assert_same(windows(reference), windows(head + middle + tail))
    assert again.state_dict()["epoch"] == 1 and again.state_dict()["consumed_samples"] == 0


def test_resume_across_an_epoch_boundary(data_dir):
    epoch0 = take(PackedTokenDataset(config(data_dir, loop=False)))
    steps = len(epoch0)
    looping = take(PackedTokenDataset(config(data_dir)), steps + 6)
    assert_same(windows(looping[:steps]), windows(epoch0))
    assert looping[steps]["meta"]["epoch"] == 1
    assert not np.array_equal(looping[steps]["tokens"], epoch0[0]["tokens"])  # reshuffled
    first = PackedTokenDataset(config(data_dir))
    take(first, steps - 2)
    second = PackedTokenDataset(config(data_dir))
    second.load_state_dict(first.state_dict())
    assert_same(windows(take(second, 8)), windows(looping[steps - 2:]))


def test_finished_pass_points_state_at_next_epoch(data_dir):
    ds = PackedTokenDataset(config(data_dir, loop=False))
    n = len(take(ds))
    assert ds.state_dict()["epoch"] == 1 and ds.state_dict()["consumed_samples"] == 0
    assert len(take(ds)) == n  # the next pass is a whole epoch (epoch 1)


def test_state_from_other_settings_is_rejected(data_dir):
    state = PackedTokenDataset(config(data_dir)).state_dict()
    other = PackedTokenDataset(config(data_dir, seq_len=SEQ + 1))
    with pytest.raises(DataPipelineError, match="seq_len"):
        other.load_state_dict(state)
    with pytest.raises(DataPipelineError, match="lacks"):
        other.load_state_dict({"epoch": 0})
