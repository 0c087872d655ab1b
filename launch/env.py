"""Which process this is: rank, world size, local rank and the rendezvous address, from the launcher's
environment, detected in this order:

  * torchrun (TORCHELASTIC_RUN_ID) or the deepspeed launcher (CROSS_RANK): RANK, WORLD_SIZE, LOCAL_RANK and
    MASTER_ADDR/PORT as they set them; also a torchrun started by srun (one task per node).
  * MPI (OMPI_COMM_WORLD_RANK, PMIX_RANK or PMI_RANK, e.g. `srun --mpi=pmix` or mpirun): rank and size from
    mpi4py's COMM_WORLD, the local rank from its shared-memory split; rank 0 broadcasts its address and a free
    port (MASTER_ADDR/MASTER_PORT in the environment take precedence).
  * SLURM (`srun python -m launch.train`; an srun task has SLURM_STEP_ID): SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID; MASTER_ADDR is the first host of `scontrol show hostnames` of the step's nodes
    (SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST), MASTER_PORT 20000 + SLURM_JOB_ID % 20000. A job's batch script
    or salloc shell (SLURM_PROCID=0 and SLURM_NTASKS > 1 there too, but no SLURM_STEP_ID) is refused: a process
    started there would wait for ranks that never start.
  * none of these: one process.
export() writes RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT into the environment, so that
torch.distributed's env:// rendezvous works the same under every launcher. An incomplete environment is a
ConfigError naming the missing variables, raised before any process group starts.
"""
from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field

import torch

from megatron_hope.config_base import ConfigError

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST")
MPI_MARKERS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")


@dataclass(frozen=True)
class ProcessEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = field(default="single", compare=False)  # single | torchrun | deepspeed | env | mpi | slurm
    master_addr: str | None = field(default=None, compare=False)
    master_port: int | None = field(default=None, compare=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ,
                     first_host: Callable[[str], str] | None = None, mpi_comm: object = None) -> ProcessEnv:
        """This process from `environ` (first_host: SLURM nodelist -> its first hostname, scontrol by default;
        mpi_comm: an mpi4py communicator, COMM_WORLD by default)."""
        if any(n in environ for n in TORCH_VARS):
            return cls._torch(environ)
        if any(n in environ for n in MPI_MARKERS):
            return cls._mpi(environ, mpi_comm)
        if "SLURM_STEP_ID" in environ:
            return cls._slurm(environ, first_host or scontrol_first_host)
        if environ.get("SLURM_NTASKS", "1") != "1":
            raise ConfigError(f"this is the batch script or salloc shell of SLURM job {environ.get('SLURM_JOB_ID')} "
                              f"(SLURM_NTASKS={environ['SLURM_NTASKS']}, no SLURM_STEP_ID), not one of its tasks: "
                              "start the ranks with `srun python -m launch.train ...` or torchrun under srun "
                              "(slurm/*.sbatch), or one process with `srun --ntasks=1 python -m launch.train ...`")
        return cls()

    @classmethod
    def _torch(cls, environ: Mapping[str, str]) -> ProcessEnv:
        missing = sorted(n for n in TORCH_VARS if n not in environ)
        if missing:
            raise ConfigError(f"the environment sets {[n for n in TORCH_VARS if n in environ]} but not {missing}; "
                              "launch with torchrun, or unset them for a single process")
        launcher = ("torchrun" if "TORCHELASTIC_RUN_ID" in environ else
                    "deepspeed" if "CROSS_RANK" in environ else "env")
        port = environ.get("MASTER_PORT")
        return cls(*_ints(environ, TORCH_VARS), launcher=launcher, master_addr=environ.get("MASTER_ADDR"),
                   master_port=int(port) if port else None)._checked()

    @classmethod
    def _slurm(cls, environ: Mapping[str, str], first_host: Callable[[str], str]) -> ProcessEnv:
        missing = [n for n in SLURM_VARS if n not in environ]
        if missing:
            raise ConfigError(f"SLURM_STEP_ID is set but {missing} are not: start the ranks with `srun` inside an "
                              "allocation (sbatch/salloc), or unset the SLURM_* variables")
        rank, world, local = _ints(environ, SLURM_VARS[:3])
        nodes = environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"]  # task 0 runs on the first
        addr = environ.get("MASTER_ADDR") or first_host(nodes)
        port = int(environ.get("MASTER_PORT") or 20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)
        return cls(rank, world, local, launcher="slurm", master_addr=addr, master_port=port)._checked()

    @classmethod
    def _mpi(cls, environ: Mapping[str, str], comm: object) -> ProcessEnv:
        if comm is None:
            try:
                from mpi4py import MPI
            except ImportError as e:
                raise ConfigError(f"an MPI launch ({[n for n in MPI_MARKERS if n in environ]} is set) needs mpi4py, "
                                  f"which does not import ({e}); `pip install mpi4py` against the cluster's MPI, "
                                  "or launch with torchrun/srun") from None
            comm = MPI.COMM_WORLD
            local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        else:
            local = int(environ.get("OMPI_COMM_WORLD_LOCAL_RANK", environ.get("SLURM_LOCALID", "0")))
        rank, world = comm.Get_rank(), comm.Get_size()
        mine = (environ.get("MASTER_ADDR") or _address(), int(environ.get("MASTER_PORT") or free_port()))
        addr, port = comm.bcast(mine if rank == 0 else None, root=0)
        return cls(rank, world, local, launcher="mpi", master_addr=addr, master_port=port)._checked()

    def _checked(self) -> ProcessEnv:
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"RANK = {self.rank} is outside 0..WORLD_SIZE-1 = {self.world_size - 1} "
                              f"(from the {self.launcher} launcher's environment)")
        return self

    def export(self, environ: MutableMapping[str, str] = os.environ) -> None:
        """Write this process's rank, sizes and rendezvous into `environ` for init_process_group (env://)."""
        environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank))
        if self.master_addr and self.master_port:
            environ.update(MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))

    def device(self, kind: str = "auto") -> torch.device:
        """This rank's device for train.device = `kind` ("auto", "cpu" or "cuda"): GPU local_rank, or the CPU."""
        if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise ConfigError("train.device = 'cuda' but CUDA is not available here; use 'auto' or 'cpu'")
        if self.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"train.device = {kind!r}: local rank {self.local_rank} has no GPU of its own "
                              f"({torch.cuda.device_count()} visible); start at most that many processes per node "
                              "or set train.device = 'cpu'")
        return torch.device("cuda", self.local_rank)


def _ints(environ: Mapping[str, str], names: tuple[str, ...]) -> list[int]:
    try:
        return [int(environ[n]) for n in names]
    except ValueError:
        raise ConfigError(f"{'/'.join(names)} must be integers, got {[environ[n] for n in names]}") from None


def scontrol_first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise ConfigError(f"cannot expand the SLURM node list {nodelist!r} with scontrol ({e}); set MASTER_ADDR "
                          "to the first node's address") from None
    if not out:
        raise ConfigError(f"scontrol expands the SLURM node list {nodelist!r} to no host; set MASTER_ADDR")
    return out[0]


def _address() -> str:
    """This host's address as the other nodes reach it: its hostname (resolved by them)."""
    return socket.gethostname()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
