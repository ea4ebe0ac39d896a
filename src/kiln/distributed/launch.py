"""Where this process sits in a tensor-parallel group, as its launcher's environment says.

Kept free of torch so that every `kiln` command can ask cheaply whether torchrun or mpirun started it.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

from kiln.errors import KilnError


@dataclass(frozen=True)
class Placement:
    """Where this process sits in the group, and how the group meets."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "kiln", "torchrun" or "mpirun"


def _env_int(env: dict[str, str], *names: str) -> int | None:
    for name in names:
        if env.get(name, "").strip():
            try:
                return int(env[name])
            except ValueError:
                raise KilnError(f"environment variable {name}={env[name]!r} is not an integer") from None
    return None


def from_environment(env: dict[str, str] | None = None) -> Placement | None:
    """The placement a launcher gave this process, or None when it was started alone."""
    env = dict(os.environ if env is None else env)
    if "KILN_TP_RANK" in env:
        launcher, rank, size = "kiln", _env_int(env, "KILN_TP_RANK"), _env_int(env, "KILN_TP_WORLD_SIZE")
        local = _env_int(env, "KILN_TP_LOCAL_RANK")
    elif "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env):
        launcher, rank, size = "torchrun", _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
        local = _env_int(env, "LOCAL_RANK")
    elif "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        launcher = "mpirun"
        rank = _env_int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK")
        size = _env_int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
        local = _env_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
    else:
        return None
    if rank is None or size is None:
        raise KilnError(f"{launcher} started this process without a rank and a world size in its environment")
    if not 0 <= rank < size:
        raise KilnError(f"rank {rank} is outside the world of {size} processes {launcher} reports")
    port = _env_int(env, "MASTER_PORT")
    if port is None:
        # Every rank of one MPI job derives the same port from the job's id.
        job = env.get("OMPI_MCA_ess_base_jobid") or env.get("PMIX_NAMESPACE") or env.get("PMI_ID", "")
        port = 20000 + zlib.crc32(job.encode()) % 20000
    return Placement(rank, size, rank if local is None else local, env.get("MASTER_ADDR", "127.0.0.1"), port,
                     launcher)
