"""Launcher detection (launch/env.py) from fake environments: what each launcher sets, which one wins, and the
errors for incomplete environments."""
from __future__ import annotations

import pytest

from launch.env import ProcessEnv
from megatron_hope.config_base import ConfigError


def test_no_launcher_is_one_process():
    env = ProcessEnv.from_environ({})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (0, 1, 0, "single")


def test_torchrun_and_deepspeed_launcher():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "x",
                "MASTER_ADDR": "n1", "MASTER_PORT": "29500", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    env = ProcessEnv.from_environ(torchrun)  # a torchrun started by srun: torchrun's variables win
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (3, 4, 1, "torchrun")
    assert (env.master_addr, env.master_port) == ("n1", 29500)
    deepspeed = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "CROSS_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29500"}
    assert ProcessEnv.from_environ(deepspeed).launcher == "deepspeed"


# What SLURM 22.05 sets (measured on the test cluster, job of 2 nodes x 1 task): the batch script and an srun task.
BATCH_SHELL = {"SLURM_JOB_ID": "12345", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
               "SLURM_LOCALID": "0"}
SRUN_TASK_1 = {**BATCH_SHELL, "SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "n[1-2]"}


def test_slurm_srun_takes_the_first_node_as_master():
    env = ProcessEnv.from_environ(SRUN_TASK_1, first_host=lambda nodes: {"n[1-2]": "n1"}[nodes])
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (1, 2, 0, "slurm")
    assert (env.master_addr, env.master_port) == ("n1", 20000 + 12345 % 20000)
    exported: dict[str, str] = {}
    env.export(exported)
    assert exported == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "n1",
                        "MASTER_PORT": str(20000 + 12345)}


class FakeComm:
    """COMM_WORLD of rank `rank`: bcast returns rank 0's value."""

    def __init__(self, rank: int, size: int, root_value: tuple[str, int]):
        self.rank, self.size, self.root_value = rank, size, root_value

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's name
        return self.rank

    def Get_size(self) -> int:  # noqa: N802
        return self.size

    def bcast(self, value, root: int = 0):
        return value if self.rank == root else self.root_value


def test_mpi_rank_comes_from_the_communicator_and_the_address_from_rank_0():
    environ = {"PMIX_RANK": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}
    env = ProcessEnv.from_environ(environ, mpi_comm=FakeComm(1, 2, ("n1", 23456)))
    assert (env.rank, env.world_size, env.launcher, env.master_addr, env.master_port) == (1, 2, "mpi", "n1", 23456)


@pytest.mark.parametrize("environ,message", [
    ({"RANK": "0"}, "not \\['LOCAL_RANK', 'WORLD_SIZE'\\]"),
    ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, "outside"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}, "SLURM_LOCALID"),
    (BATCH_SHELL, "batch script or salloc shell of SLURM job 12345"),  # would wait for a rank 1 forever
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]"}, "salloc shell"),
    ({"RANK": "a", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "must be integers"),
])
def test_incomplete_environments_are_named(environ, message):
    with pytest.raises(ConfigError, match=message):
        ProcessEnv.from_environ(environ, first_host=lambda nodes: "n1")


def test_slurm_master_is_the_first_node_of_the_step():
    """`srun -w n2 ...` in a job on n1 and n2: task 0 runs on n2, the first node of the step, not of the job."""
    environ = {**SRUN_TASK_1, "SLURM_STEP_NODELIST": "n2", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}
    env = ProcessEnv.from_environ(environ, first_host=lambda nodes: {"n2": "n2", "n[1-2]": "n1"}[nodes])
    assert (env.world_size, env.master_addr) == (1, "n2")


def test_one_task_batch_script_is_one_process():
    environ = {**BATCH_SHELL, "SLURM_NTASKS": "1"}
    assert ProcessEnv.from_environ(environ, first_host=lambda nodes: "n1") == ProcessEnv()
