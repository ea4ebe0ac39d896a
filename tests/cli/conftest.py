"""Helpers for the CLI tests: run `python -m kiln ...` in a subprocess, alone or a few side by side.

Every command runs with KILN_HOME set (from the environment, or /tmp/kiln-home-tests), so that the
embedded SmolLM2 is converted to a Hugging Face folder once per machine, and `kiln quickstart` finds the
same cache. The converted checkpoint and the engine the `run` tests share are made once per session.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

KILN_HOME = Path(os.environ.get("KILN_HOME") or "/tmp/kiln-home-tests")
TIMEOUT_S = 600  # one command; the real ones take seconds, this only stops a hang
T = TypeVar("T")

# The engine every `kiln run` test uses: small limits, so that requests over them are cheap to make.
MAX_BATCH_SIZE = 2
MAX_INPUT_LEN = 128
MAX_SEQ_LEN = 256
MAX_NUM_TOKENS = 256

# trtllm-build's flags as a seed's command line passes them (--use_fused_mlp twice: with a value, and bare).
SEED_BUILD_FLAGS = [
    "--gemm_plugin", "float16",
    "--max_batch_size", str(MAX_BATCH_SIZE),
    "--max_input_len", str(MAX_INPUT_LEN),
    "--max_seq_len", str(MAX_SEQ_LEN),
    "--max_num_tokens", str(MAX_NUM_TOKENS),
    "--context_fmha", "enable",
    "--paged_kv_cache", "enable",
    "--remove_input_padding", "enable",
    "--use_paged_context_fmha", "enable",
    "--tokens_per_block", "64",
    "--use_fused_mlp", "enable",
    "--profiling_verbosity", "none",
    "--use_fused_mlp",
    "--gpt_attention_plugin", "float16",
    "--logits_dtype", "float16",
    "--paged_state", "disable",
    "--gather_all_token_logits",
    "--enable_xqa", "enable",
    "--workers", "4",
]


def kiln_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["KILN_HOME"] = str(KILN_HOME)
    # One intra-op thread per command: on a small, shared CPU torch's thread pool spends most of a
    # decode step waiting for its threads (about 8x slower on 2 cores), and the tests run commands
    # side by side anyway.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env


_running: set[subprocess.Popen[str]] = set()  # so that the session's end can stop what it no longer needs
_running_lock = threading.Lock()
_stopped = threading.Event()


def kiln(*args: Any, env: dict[str, str] | None = None, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run `python -m kiln ARGS...` and return the finished process (output captured as text)."""
    cmd = [sys.executable, "-m", "kiln", *map(str, args)]
    if _stopped.is_set():
        raise RuntimeError(f"the session is over: `{' '.join(cmd[2:])}` not started")
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env or kiln_env()) as proc:
        with _running_lock:
            _running.add(proc)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            raise AssertionError(
                f"`{' '.join(cmd[2:])}` ran over {timeout} s\n{stdout[-2000:]}\n{stderr[-2000:]}"
            ) from None
        finally:
            with _running_lock:
                _running.discard(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    cmd = " ".join(map(str, proc.args[2:]))
    return f"`{cmd}` exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"


def check_ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    return proc


def check_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """A user's mistake: non-zero exit, no traceback, and one error line on stderr (after argparse's usage
    lines, for a bad flag) that starts with `kiln COMMAND: error:` and names each of `needles`.
    Returns that line."""
    assert proc.returncode != 0, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    command = str(proc.args[3])  # [python, -m, kiln, COMMAND, ...]
    lines = proc.stderr.strip().splitlines()
    assert lines, describe(proc)
    error = lines[-1]
    assert error.startswith(f"kiln {command}: error: "), describe(proc)
    before = lines[:-1]
    if before:  # only argparse's usage may come first
        assert before[0].startswith(f"usage: kiln {command}"), describe(proc)
        assert all(line.startswith(" ") for line in before[1:]), describe(proc)
    for needle in needles:
        assert needle in error, f"{needle!r} not in the error line {error!r}\n{describe(proc)}"
    return error


class Background:
    """A few kiln commands (or functions that run them) at a time, in threads; results are futures."""

    def __init__(self, workers: int):
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="kiln-cli-test")

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        return self._pool.submit(fn, *args, **kwargs)

    def kiln(self, *args: Any, **kwargs: Any) -> Future[subprocess.CompletedProcess[str]]:
        return self._pool.submit(kiln, *args, **kwargs)

    def shutdown(self) -> None:
        """Drop the commands not started yet and stop those still running (no test waits for them now)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        _stopped.set()
        with _running_lock:
            for proc in _running:
                proc.terminate()
        self._pool.shutdown(wait=True)


@pytest.fixture(scope="session")
def background() -> Iterator[Background]:
    bg = Background(workers=min(4, max(2, os.cpu_count() or 2)))
    yield bg
    bg.shutdown()


@pytest.fixture(scope="session")
def smollm2_hf() -> Path:
    """The root fixture, in the KILN_HOME the commands use (it would otherwise follow the test process's)."""
    from kiln.assets import smollm2_hf_dir

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_HOME", str(KILN_HOME))
        return smollm2_hf_dir()


@dataclass
class Artifacts:
    """What the session makes once, started in the background as soon as a test needs any of it.

    checkpoint: `kiln convert --model_dir` (float32); gguf_checkpoint: `kiln convert --gguf` (dtype auto);
    engine: `kiln build` of `checkpoint` with every seed flag; quickstart: `kiln quickstart` run twice in
    KILN_HOME (it only reads the Hugging Face folder the others use). Each future holds the processes.
    """

    checkpoint_dir: Path
    gguf_checkpoint_dir: Path
    engine_dir: Path
    convert: Future[subprocess.CompletedProcess[str]]
    convert_gguf: Future[subprocess.CompletedProcess[str]]
    build: Future[subprocess.CompletedProcess[str]]
    quickstart: Future[tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]]


@pytest.fixture(scope="session")
def artifacts(smollm2_hf: Path, background: Background, tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    from kiln.assets import smollm2_gguf

    tmp = tmp_path_factory.mktemp("artifacts")
    ckpt, gguf_ckpt, engine = tmp / "checkpoint", tmp / "checkpoint-gguf", tmp / "engine"
    convert = background.kiln("convert", "--model_dir", smollm2_hf, "--output_dir", ckpt, "--dtype", "float32")
    convert_gguf = background.kiln("convert", "--gguf", smollm2_gguf(), "--output_dir", gguf_ckpt)

    def build() -> subprocess.CompletedProcess[str]:
        check_ok(convert.result())
        return kiln("build", "--checkpoint_dir", ckpt, "--output_dir", engine, *SEED_BUILD_FLAGS)

    def quickstart_twice() -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
        first = kiln("quickstart")
        return first, kiln("quickstart")

    build_job = background.call(build)
    return Artifacts(ckpt, gguf_ckpt, engine, convert, convert_gguf, build_job, background.call(quickstart_twice))


@pytest.fixture(scope="session")
def checkpoint(artifacts: Artifacts) -> Path:
    check_ok(artifacts.convert.result())
    return artifacts.checkpoint_dir


@pytest.fixture(scope="session")
def engine(artifacts: Artifacts) -> Path:
    check_ok(artifacts.build.result())
    return artifacts.engine_dir


@pytest.fixture(scope="session")
def tokenizer(smollm2_hf: Path) -> Any:
    """SmolLM2's tokenizer (the `tokenizers` library: fast to load) to count and decode tokens in tests."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(smollm2_hf / "tokenizer.json"))
