"""What the files of a checkpoint say of each other is checked on every check, with or without hashes: a damage
that keeps the manifest right (it was written again) is still named, and `verify_on_load = false` does not resume
from it. What stays unnoticed without hashes: a changed byte that keeps every size (test_damage)."""
from __future__ import annotations

import shutil

import pytest
import torch

from checkpoint_helpers import STEPS, metadata, rewrite, rewrite_metadata, shard
from checkpoints.errors import CheckpointError
from checkpoints.layout import step_name
from checkpoints.manager import CheckpointManager
from checkpoints.manifest import problems
from megatron_hope.config import CheckpointConfig


def first_item(directory):
    """(name, storage item) of the first tensor entry DCP stored."""
    index, item = next(iter(metadata(directory).storage_data.items()))
    return index.fqn, item


def shorten_shard(directory) -> str:
    """The shard loses its last 100 bytes, and the manifest says so; the problem expected."""
    path = shard(directory)
    size = path.stat().st_size - 100
    rewrite(directory, lambda d: path.write_bytes(path.read_bytes()[:size]))
    index, item = next((i, s) for i, s in metadata(directory).storage_data.items() if s.offset + s.length > size)
    return f"{path.name}: {size} bytes, but the metadata places {index.fqn} at bytes {item.offset}.." \
           f"{item.offset + item.length} (truncated?)"


def name_a_missing_file(directory) -> str:
    fqn, _ = first_item(directory)

    def change(md):
        next(s for i, s in md.storage_data.items() if i.fqn == fqn).relative_path = "__1_0.distcp"
    rewrite_metadata(directory, change)
    return f"__1_0.distcp: missing (not in the manifest), though the metadata places {fqn} in it"


def drop_a_rank_file(directory) -> str:
    rewrite(directory, lambda d: (d / "rank_00000.pt").unlink())
    return "rank_00000.pt: missing (not in the manifest), though the run state says 1 rank(s) saved the checkpoint"


def drop_a_chunks_rows(directory) -> str:
    fqn = next(k for k, m in metadata(directory).state_dict_metadata.items() if getattr(m, "size", ()) and
               len(m.size) == 2)

    def change(md):
        chunk = md.state_dict_metadata[fqn].chunks[0]
        chunk.sizes = torch.Size([chunk.sizes[0] - 1, chunk.sizes[1]])
    rewrite_metadata(directory, change)
    size = metadata(directory).state_dict_metadata[fqn].size
    return f".metadata: {fqn}: its chunks hold {size.numel() - size[1]} of its {size.numel()} elements"


DAMAGE = [shorten_shard, name_a_missing_file, drop_a_rank_file, drop_a_chunks_rows]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__ for d in DAMAGE])
def test_a_damage_the_manifest_agrees_with_is_named_without_hashes(run, tmp_path, damage):
    copy = tmp_path / run.newest.name
    shutil.copytree(run.newest, copy)
    expected = damage(copy)
    assert problems(copy, checksums=False) == problems(copy) == [expected]


def test_resuming_without_hashes_refuses_it(run, tmp_path):
    run_dir = tmp_path / "saved"
    shutil.copytree(run.root.parent, run_dir)
    newest = run_dir / "checkpoints" / step_name(STEPS)
    expected = shorten_shard(newest)
    log = []
    manager = CheckpointManager(run_dir, CheckpointConfig(verify_on_load=False), log.append)
    with pytest.raises(CheckpointError) as e:
        manager.find(str(newest))
    assert str(e.value) == f"checkpoint.resume = {newest}: {expected}"
    assert manager.find("auto") == run_dir / "checkpoints" / step_name(STEPS - 1)
    assert len(log) == 1 and log[0].startswith(f"skipping checkpoint {newest}: {expected}")
