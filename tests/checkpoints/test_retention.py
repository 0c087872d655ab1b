"""Retention: keep the newest keep_last checkpoints, every keep_every-th and the one `latest` names."""
from __future__ import annotations

from checkpoint_helpers import STEPS
from checkpoints.layout import step_dirs, step_name, to_delete


def test_the_rule():
    assert to_delete([1, 2, 3, 4, 5, 6, 7], keep_last=2, keep_every=3, protect=set()) == [1, 2, 4, 5]
    assert to_delete([1, 2, 3, 4, 5], keep_last=2, keep_every=2, protect=set()) == [1, 3]
    assert to_delete([1, 2, 3], keep_last=1, keep_every=0, protect={2}) == [1]
    assert to_delete([1, 2, 3], keep_last=0, keep_every=5, protect=set()) == []  # keep_last 0: keep all


def test_a_run_saving_every_step_keeps_what_the_rule_keeps(run):
    saved = list(range(1, STEPS + 1))
    kept = sorted(set(saved) - set(to_delete(saved, keep_last=2, keep_every=2, protect={STEPS})))
    assert kept == [2, 4, 5]
    assert sorted(p.name for p in run.root.iterdir()) == sorted([step_name(s) for s in kept] + ["latest"])
    assert [p.name for p in step_dirs(run.root)] == [step_name(s) for s in reversed(kept)]
    assert (run.root / "latest").read_text().strip() == step_name(STEPS)
