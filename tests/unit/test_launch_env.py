"""Where a process sits in a tensor-parallel group, read from each launcher's environment."""

from __future__ import annotations

import pytest

from kiln.distributed.group import Placement, describe_exit, from_environment, timeout_s
from kiln.errors import KilnError


def test_alone_is_none():
    assert from_environment({"PATH": "/usr/bin"}) is None


def test_torchrun():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400",
           "TORCHELASTIC_RUN_ID": "x"}
    assert from_environment(env) == Placement(1, 2, 1, "10.0.0.5", 29400, "torchrun")


def test_openmpi_derives_one_port_per_job():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_MCA_ess_base_jobid": "184942593"}
    p = from_environment(env)
    assert (p.rank, p.world_size, p.local_rank, p.master_addr, p.launcher) == (3, 4, 1, "127.0.0.1", "mpirun")
    assert 20000 <= p.master_port < 40000
    other_rank = from_environment({**env, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"})
    assert other_rank.master_port == p.master_port  # every rank of the job meets at the same port
    other_job = from_environment({**env, "OMPI_MCA_ess_base_jobid": "99"})
    assert other_job.master_port != p.master_port
    assert from_environment({**env, "MASTER_PORT": "31000"}).master_port == 31000


def test_mpich():
    p = from_environment({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MASTER_ADDR": "h0"})
    assert (p.rank, p.world_size, p.local_rank, p.master_addr, p.launcher) == (1, 2, 1, "h0", "mpirun")


def test_kiln_started_rank():
    env = {"KILN_TP_RANK": "1", "KILN_TP_WORLD_SIZE": "2", "KILN_TP_LOCAL_RANK": "1", "MASTER_PORT": "1234"}
    assert from_environment(env) == Placement(1, 2, 1, "127.0.0.1", 1234, "kiln")


@pytest.mark.parametrize("env, words", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 is outside the world of 2"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "without a rank"),
])
def test_bad_environment_is_a_clear_error(env, words):
    with pytest.raises(KilnError, match=words):
        from_environment(env)


def test_timeout_setting(monkeypatch):
    monkeypatch.delenv("KILN_TP_TIMEOUT_S", raising=False)
    assert timeout_s() == 120.0
    monkeypatch.setenv("KILN_TP_TIMEOUT_S", "7.5")
    assert timeout_s() == 7.5
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv("KILN_TP_TIMEOUT_S", bad)
        with pytest.raises(KilnError, match="KILN_TP_TIMEOUT_S"):
            timeout_s()


def test_describe_exit():
    assert describe_exit(-9) == "was killed by SIGKILL"
    assert describe_exit(3) == "exited with status 3"
