"""`kiln serve` on the command line: its help, its mistakes (one line, before the engine loads), and a
smoke run: start it on a free port, wait until it is ready, ask it once through each API, stop it."""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import KV_CACHE_TOKENS

START_TIMEOUT_S = 120  # import + engine load; seconds on an idle machine


def kiln(*args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kiln", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_help_lists_the_flags() -> None:
    out = kiln("serve", "--help")
    assert out.returncode == 0
    for flag in ("--engine_dir", "--tokenizer_dir", "--host", "--port", "--served_model_name", "--api_key",
                 "--kv_cache_free_gpu_memory_fraction", "--max_tokens_in_paged_kv_cache",
                 "--disable_prefix_caching", "--log_level"):
        assert flag in out.stdout, flag


def test_mistakes_are_one_line(tmp_path: Path) -> None:
    out = kiln("serve", "--engine_dir", tmp_path, "--tokenizer_dir", tmp_path, "--port", "70000")
    assert out.returncode == 2 and "--port" in out.stderr and "65535" in out.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        out = kiln("serve", "--engine_dir", tmp_path, "--tokenizer_dir", tmp_path, "--port", port)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("kiln serve: error: cannot listen on")
    assert "--port" in out.stderr


def read_url(proc: subprocess.Popen[str], timeout: float) -> str:
    """The URL the server prints once it is about to listen (its output otherwise goes on)."""
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline, seen = time.monotonic() + timeout, ""
    while time.monotonic() < deadline and proc.poll() is None:
        if selector.select(timeout=0.5):
            line = proc.stdout.readline()
            seen += line
            found = re.search(r"at (http://\S+) ", line)
            if found:
                return found.group(1)
    errors = proc.stderr.read() if proc.poll() is not None else ""
    raise AssertionError(f"no URL printed in {timeout} s:\n{seen}\n{errors}")


@pytest.mark.parametrize("engine", ["--engine_thread", "--engine_process"])
def test_serve_smoke(serve_engine_dir: Path, smollm2_hf: Path, engine: str) -> None:
    cmd = [sys.executable, "-m", "kiln", "serve", "--engine_dir", str(serve_engine_dir), "--tokenizer_dir",
           str(smollm2_hf), "--port", "0", "--device", "cpu", "--served_model_name", "smoke",
           "--max_tokens_in_paged_kv_cache", str(KV_CACHE_TOKENS), "--log_level", "warning", engine]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        url = read_url(proc, START_TIMEOUT_S)
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=url, timeout=60) as http:
            deadline = time.monotonic() + 30
            while http.get("/v2/health/ready").status_code != 200:
                assert time.monotonic() < deadline, "not ready"
                time.sleep(0.1)
            assert http.get("/v1/models").json()["data"][0]["id"] == "smoke"
            out = http.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 2,
                                                      "temperature": 0})
            assert out.status_code == 200 and out.json()["choices"][0]["text"].startswith(" Paris")
            gen = http.post("/v2/models/ensemble/generate", json={"text_input": "Hi", "max_tokens": 1})
            assert gen.status_code == 200
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
        assert "server stopped" in stderr and "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
