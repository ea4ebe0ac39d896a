"""kiln serve: an engine behind an HTTP server, with OpenAI's API and Triton's KServe v2 (trtllm-serve's
and vLLM's flag names).

The address is checked (and bound) before the engine loads, so that a port in use fails in a second
rather than after the model has been read. The server listens on 127.0.0.1 unless told otherwise: an
engine is a machine's GPU, and exposing it is a choice to make (with --api_key).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from kiln.cli.options import non_negative_int, positive_int
from kiln.errors import KilnError

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve an engine over HTTP (OpenAI and KServe v2 APIs)",
        description="Serve an engine over HTTP: OpenAI's /v1/completions, /v1/chat/completions and "
        "/v1/models; Triton's KServe v2 /v2/models/NAME/generate[_stream] (also as 'ensemble'); "
        "Prometheus /metrics. Ctrl-C stops it.",
    )
    p.add_argument("--engine_dir", required=True, help="engine folder from `kiln build`")
    p.add_argument("--tokenizer_dir", required=True,
                   help="folder with the tokenizer (the Hugging Face model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0: every one)")
    p.add_argument("--port", type=port_number, default=8000, help="port (default 8000; 0: any free one)")
    p.add_argument("--served_model_name",
                   help="the model's name in the APIs (default: the engine folder's name)")
    p.add_argument("--api_key", default=os.environ.get("KILN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health and /v2/health "
                   "(default: $KILN_API_KEY, else none)")
    p.add_argument("--device", default=None,
                   help="cpu or cuda (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--kv_cache_free_gpu_memory_fraction", type=fraction, default=None,
                   help="share of the free GPU memory the KV cache takes (default 0.9)")
    p.add_argument("--max_tokens_in_paged_kv_cache", type=positive_int, default=None,
                   help="size the KV cache in tokens instead")
    p.add_argument("--max_queue_size", type=non_negative_int, default=2048,
                   help="requests that may wait beyond the engine's max_batch_size running; more get HTTP 429 "
                   "with Retry-After (default 2048)")
    caching = p.add_mutually_exclusive_group()
    caching.add_argument("--enable_prefix_caching", dest="enable_prefix_caching", action="store_true",
                         default=True, help="reuse the KV blocks of shared prompt prefixes (the default)")
    caching.add_argument("--disable_prefix_caching", dest="enable_prefix_caching", action="store_false")
    proc = p.add_mutually_exclusive_group()
    proc.add_argument("--engine_process", dest="engine_process", action="store_true", default=None,
                      help="run the engine in a process of its own, so HTTP work never delays a step "
                      "(the default with a GPU)")
    proc.add_argument("--engine_thread", dest="engine_process", action="store_false",
                      help="run the engine in a thread of the server's process (the default on a CPU)")
    p.add_argument("--log_level", default="info", type=str.lower, choices=LOG_LEVELS, help="default info")
    p.set_defaults(func=main)


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is invalid: a port is 0 to 65535 (0: any free one)")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: it must be in (0, 1]")
    return value


def main(args: argparse.Namespace) -> int:
    engine_dir = Path(args.engine_dir)
    name = args.served_model_name if args.served_model_name is not None else engine_dir.resolve().name
    if not name.strip():
        raise KilnError(f"--served_model_name {name!r} is empty: give the model a name")
    sock = bind(args.host, args.port)
    try:
        return serve(args, sock, name)
    finally:
        sock.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a KilnError that says why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise KilnError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise KilnError(f"cannot listen on {host}:{port} ({e.strerror}): is another server running there? "
                        "Pick another --port (0: any free one)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_until_signal(server: Any, sock: socket.socket) -> None:
    """Serve until Ctrl-C or SIGTERM, which end the command normally: uvicorn shuts down gracefully and
    then raises the signal again, to the handlers it found, which here do nothing."""
    quiet = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in quiet.items():
            signal.signal(sig, handler)


def serve(args: argparse.Namespace, sock: socket.socket, name: str) -> int:
    import uvicorn

    from kiln.serve.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)-9s %(name)s: %(message)s")
    engine = start_engine(args)
    try:
        app = create_app(engine, name, api_key=args.api_key, max_queue_size=args.max_queue_size)
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        print(f"[kiln] serving {name!r} on {device_of(args)} at {url} (OpenAI: {url}/v1, KServe v2: {url}/v2, "
              f"metrics: {url}/metrics{', API key required' if args.api_key else ''})", flush=True)
        config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
        run_until_signal(uvicorn.Server(config), sock)
    finally:
        engine.shutdown()
    print("[kiln] server stopped", file=sys.stderr)
    return 0


def device_of(args: argparse.Namespace) -> str:
    from kiln.builder.device import default_device

    return args.device or default_device()


def start_engine(args: argparse.Namespace):  # noqa: ANN201 - AsyncLLM or ProcessAsyncLLM
    """The engine, in a process of its own (default with a GPU) or in a thread of this one."""
    from kiln.runtime.async_engine import AsyncLLM
    from kiln.runtime.engine import LLM

    device = device_of(args)
    kwargs = dict(kv_cache_free_gpu_memory_fraction=args.kv_cache_free_gpu_memory_fraction,
                  max_tokens_in_paged_kv_cache=args.max_tokens_in_paged_kv_cache,
                  enable_prefix_caching=args.enable_prefix_caching)
    use_process = args.engine_process if args.engine_process is not None else device.startswith("cuda")
    if use_process:
        from kiln.runtime.engine_process import EngineSpec, ProcessAsyncLLM
        from kiln.runtime.loader import ModelSource

        return ProcessAsyncLLM(EngineSpec(device, ModelSource(engine_dir=str(args.engine_dir)), kwargs),
                               args.tokenizer_dir)
    return AsyncLLM(LLM(args.engine_dir, args.tokenizer_dir, device=device, **kwargs))
