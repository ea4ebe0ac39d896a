"""One real server for all the `kiln serve` tests: SmolLM2-135M (float32, CPU) behind `create_app`, run by
uvicorn in a background thread on a free port, and a second app on the same engine that wants an API key.

The engine is built once per session with small limits (max_input_len 256, max_seq_len 512) and a KV
cache of 4096 tokens. Torch gets one intra-op thread: on a small shared CPU more threads mostly wait for
each other. Requests in the tests ask for few tokens, so that the whole folder runs in about a minute.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kiln.builder.build import build_engine
from kiln.checkpoint.convert import convert_hf
from kiln.config import BuildConfig
from kiln.runtime.async_engine import AsyncLLM
from kiln.runtime.engine import LLM

MODEL = "smollm2"
API_KEY = "test-key"
MAX_INPUT_LEN = 256
MAX_SEQ_LEN = 512
KV_CACHE_TOKENS = 4096


@dataclass
class Server:
    url: str
    app: object
    engine: AsyncLLM


@pytest.fixture(scope="session")
def serve_engine_dir(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("serve")
    convert_hf(smollm2_hf, tmp / "ckpt", "float32")
    build = BuildConfig(max_batch_size=64, max_input_len=MAX_INPUT_LEN, max_seq_len=MAX_SEQ_LEN,
                        max_num_tokens=1024, tokens_per_block=16)
    build_engine(tmp / "ckpt", tmp / "engine", build)
    shutil.rmtree(tmp / "ckpt")
    yield tmp / "engine"
    shutil.rmtree(tmp)


@pytest.fixture(scope="session")
def engine(serve_engine_dir: Path, smollm2_hf: Path) -> Iterator[AsyncLLM]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    llm = LLM(serve_engine_dir, smollm2_hf, device="cpu", max_tokens_in_paged_kv_cache=KV_CACHE_TOKENS)
    engine = AsyncLLM(llm)
    yield engine
    engine.shutdown()
    torch.set_num_threads(threads)


def run_server(app: object) -> Iterator[str]:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the server did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="session")
def server(engine: AsyncLLM) -> Iterator[Server]:
    from kiln.serve.app import create_app

    app = create_app(engine, MODEL)
    for url in run_server(app):
        yield Server(url, app, engine)


@pytest.fixture(scope="session")
def keyed_server(engine: AsyncLLM) -> Iterator[Server]:
    from kiln.serve.app import create_app

    app = create_app(engine, MODEL, api_key=API_KEY)
    for url in run_server(app):
        yield Server(url, app, engine)


def wait_idle(engine: AsyncLLM, timeout: float = 10.0) -> None:
    """Until the engine holds no request and no KV block (aborts land before its next step)."""
    llm = engine.llm
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if llm.blocks.num_used == 0 and not llm.scheduler.running and not llm.scheduler.waiting:
            return
        time.sleep(0.02)
    raise AssertionError(f"the engine is not idle after {timeout} s: {llm.blocks.num_used} blocks used, "
                         f"{len(llm.scheduler.running)} running, {len(llm.scheduler.waiting)} waiting")
