"""Starting a 2-rank engine the three ways a user can, on the CPU (gloo), and losing a rank.

`kiln run` starts the second rank itself; `torchrun --nproc-per-node 2 $(which kiln) run ...` and
`mpirun -n 2 kiln run ...` start both, and rank 1 learns what to load from rank 0. Each must print
the same text and token ids as the 1-rank engine. A rank that is killed must bring the whole group
down with a message naming it, well within 30 s, and leave no process behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from .conftest import alive, children, kiln_script, run, tp_env, wait_gone

PROMPTS = ["In the beginning God created", "And the earth was without form"]


def run_args(engine, hf, csv_path) -> list[str]:
    return ["run", "--engine_dir", str(engine), "--tokenizer_dir", str(hf), "--input_text", *PROMPTS,
            "--max_output_len", "24", "--output_csv", str(csv_path), "--device", "cpu"]


def outputs(proc: subprocess.CompletedProcess[str], csv_path) -> tuple[list[str], str]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("Output [Text")]
    assert len(lines) == len(PROMPTS), proc.stdout
    return lines, csv_path.read_text()


@pytest.fixture(scope="module")
def single_rank(tp_model, tmp_path_factory):
    csv_path = tmp_path_factory.mktemp("tp1") / "out.csv"
    proc = run([sys.executable, "-m", "kiln", *run_args(tp_model["engine1"], tp_model["hf"], csv_path)])
    lines, ids = outputs(proc, csv_path)
    assert len(ids.splitlines()) == len(PROMPTS) and all(len(r.split(",")) == 24 for r in ids.splitlines())
    return lines, ids


def test_kiln_run_starts_the_second_rank_itself(tp_model, single_rank, tmp_path):
    proc = run([sys.executable, "-m", "kiln", *run_args(tp_model["engine2"], tp_model["hf"], tmp_path / "o.csv")])
    assert outputs(proc, tmp_path / "o.csv") == single_rank


def test_torchrun_launch(tp_model, single_rank, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun comes with torch"
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", kiln_script(),
           *run_args(tp_model["engine2"], tp_model["hf"], tmp_path / "o.csv")]
    assert outputs(run(cmd), tmp_path / "o.csv") == single_rank


def test_mpirun_launch(tp_model, single_rank, tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        if os.environ.get("KILN_REQUIRE_MPI"):
            pytest.fail("mpirun is missing: .ci/run installs Debian's openmpi-bin")
        pytest.skip("mpirun is not installed (Debian: apt-get install openmpi-bin)")
    cmd = [mpirun, "-n", "2", kiln_script(), *run_args(tp_model["engine2"], tp_model["hf"], tmp_path / "o.csv")]
    assert outputs(run(cmd), tmp_path / "o.csv") == single_rank


def test_engine_with_more_ranks_than_launched(tp_model):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", kiln_script(), "run", "--engine_dir",
           str(tp_model["engine1"]), "--tokenizer_dir", str(tp_model["hf"]), "--input_text", "x", "--device", "cpu"]
    proc = run(cmd, timeout=120)
    assert proc.returncode != 0
    assert "the engine has 1 rank but torchrun started 2 processes" in proc.stderr


# ---- losing a rank ------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(cmd: list[str], port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=tp_env(),
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("the server did not become ready")


def _serve_args(tp_model, port: int) -> list[str]:
    return ["serve", "--engine_dir", str(tp_model["engine2"]), "--tokenizer_dir", str(tp_model["hf"]),
            "--port", str(port), "--device", "cpu", "--engine_thread"]


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def test_killed_rank_stops_kiln_serve(tp_model):
    port = _free_port()
    server = _start_server([sys.executable, "-m", "kiln", *_serve_args(tp_model, port)], port)
    try:
        workers = children(server.pid)
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        start = time.monotonic()
        out, _ = server.communicate(timeout=30)
        assert time.monotonic() - start < 30
        assert server.returncode != 0
        assert "tensor-parallel rank 1" in out and "SIGKILL" in out, out[-3000:]
        assert not alive(workers[0])
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)


def test_rank0_gone_ends_the_other_rank(tp_model):
    port = _free_port()
    server = _start_server([sys.executable, "-m", "kiln", *_serve_args(tp_model, port)], port)
    try:
        workers = children(server.pid)
        assert len(workers) == 1
        server.kill()  # no chance to say goodbye
        server.wait(10)
        assert wait_gone(workers[0], 30), "rank 1 outlived rank 0"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)


def test_killed_rank_under_torchrun(tp_model):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    port = _free_port()
    server = _start_server([torchrun, "--standalone", "--nproc-per-node", "2", kiln_script(),
                            *_serve_args(tp_model, port)], port)
    try:
        ranks = children(server.pid)  # torchrun's agent starts both ranks
        assert len(ranks) == 2, ranks
        os.kill(max(ranks), signal.SIGKILL)
        start = time.monotonic()
        out, _ = server.communicate(timeout=30)
        assert time.monotonic() - start < 30
        assert server.returncode != 0, out[-3000:]
        assert all(wait_gone(p, 10) for p in ranks)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
