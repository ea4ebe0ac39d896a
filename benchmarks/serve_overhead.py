"""The HTTP process's own cost of a streamed token: server CPU per event, and the TTFT a client sees.

    python3 benchmarks/serve_overhead.py [--streams 64] [--step_ms 7] [--output_len 128] [--rounds 3]
    python3 benchmarks/serve_overhead.py --profile /tmp/serve.prof   # cProfile of the server's event loop

The server is the real one (`create_app` behind uvicorn, `ProcessAsyncLLM` receiving each step's tokens
through its pipe), in a process of its own; the engine process behind it is a fake that gives every
running request one token each `--step_ms`, as a decode step of a GPU would, and costs the server
nothing a real engine would not. The client is a small raw-socket HTTP client in this process that
only counts events, so that the server's figures are not the client's. For each protocol (OpenAI
/v1/completions streaming with the usage at the end, as `kiln bench serve` asks; KServe v2
generate_stream) it runs `--rounds` waves of `--streams` concurrent requests and reports the server
process's CPU (all its threads: the event loop and the thread receiving the engine's steps) per
received event and per request, its share of one core, the output tokens/s against the fake engine's
pace, and the time to the first event. All requests of a wave start, and end, together (as with
`kiln bench serve` at a fixed concurrency and equal lengths), so TTFT is mostly the time the server
takes to admit a whole wave. `stolen` is the CPU time a hypervisor gave to other machines during the
run, as a share of one core: where it is high, the times are noise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

MODEL = "fake"
WORDS_OFFSET = 2  # synthetic_tokenizer's ids: 0 unknown, 1 end of text, then the words


# ---- the fake engine (runs in the engine process) ---------------------------------------------------
@dataclass
class _Blocks:
    num_blocks: int
    num_used: int = 0
    num_cached: int = 0
    hit_rate: float = 0.0


@dataclass
class _Scheduler:
    max_batch_size: int
    waiting: list[Any] = field(default_factory=list)
    running: list[Any] = field(default_factory=list)
    num_preemptions: int = 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Any) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Any, reason: str) -> None:
        from kiln.runtime.sequence import Status

        seq.status, seq.finish_reason = Status.FINISHED, reason
        for queue in (self.waiting, self.running):
            if seq in queue:
                queue.remove(seq)


class FakeLLM:
    """What the engine process's loop uses of an LLM: a step gives each running request one token (a
    word of the tokenizer), on a fixed pace; a new request joins at the next step and gets its first."""

    def __init__(self, config: Any, step_s: float, num_words: int):
        self.config, self.step_s, self.num_words = config, step_s, num_words
        self.device = "cpu"
        self.blocks = _Blocks(num_blocks=1 << 20)
        self.scheduler = _Scheduler(config.build.max_batch_size)
        self.last_step_tokens = 0
        self._next = 0.0

    def step(self) -> list[tuple[Any, list[int]]]:
        from kiln.runtime.sequence import Status

        now = time.perf_counter()
        if self._next < now - self.step_s:  # idle until now: start a fresh pace
            self._next = now + self.step_s
        time.sleep(max(0.0, self._next - now))
        self._next += self.step_s
        sc = self.scheduler
        while sc.waiting and len(sc.running) < sc.max_batch_size:
            sc.running.append(sc.waiting.pop(0))
        results = []
        for seq in sc.running:
            token = WORDS_OFFSET + (seq.seq_id + len(seq.output_ids)) % self.num_words
            seq.output_ids.append(token)
            if len(seq.output_ids) >= seq.params.max_tokens:
                seq.status, seq.finish_reason = Status.FINISHED, "length"
            results.append((seq, [token]))
        sc.running = [s for s in sc.running if not s.finished]
        self.last_step_tokens = len(results)
        return results


@dataclass(frozen=True)
class FakeSpec:
    """Stands for EngineSpec: what the engine process builds."""

    config: Any
    step_s: float
    num_words: int

    def create(self) -> FakeLLM:
        return FakeLLM(self.config, self.step_s, self.num_words)


# ---- the server (its own process) -------------------------------------------------------------------
def engine_config(streams: int) -> Any:
    from kiln.bench.synthetic import SHAPES
    from kiln.builder.engine_file import EngineConfig, current_versions
    from kiln.config import BuildConfig

    build = BuildConfig(max_batch_size=streams, max_input_len=1024, max_seq_len=2048, max_num_tokens=8192)
    return EngineConfig(model=SHAPES["llama-3.1-8b"], build=build, dtype="bfloat16", tp_size=1,
                        device={"name": "cpu"}, quantization={}, flags={"synthetic": "fake"},
                        versions=current_versions())


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from kiln.bench.serve_load import WORDS
    from kiln.bench.synthetic import synthetic_tokenizer
    from kiln.runtime.engine_process import ProcessAsyncLLM
    from kiln.serve.app import create_app

    words = tuple(dict.fromkeys(WORDS))
    tokenizer = synthetic_tokenizer(len(words) + WORDS_OFFSET, words)
    spec = FakeSpec(engine_config(args.streams), args.step_ms / 1000, len(words))
    engine = ProcessAsyncLLM(spec, tokenizer=tokenizer)  # type: ignore[arg-type]
    app = create_app(engine, MODEL)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    if args.profile:  # the measured phases only: SIGUSR1 starts, SIGUSR2 stops and writes
        import cProfile

        profile = cProfile.Profile()
        signal.signal(signal.SIGUSR1, lambda *_: profile.enable())
        signal.signal(signal.SIGUSR2, lambda *_: (profile.disable(), profile.dump_stats(args.profile)))
    signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn raises the signal it stopped on again
    try:
        server.run()
    finally:
        engine.shutdown()


# ---- the client ---------------------------------------------------------------------------------------
@dataclass
class Phase:
    protocol: str
    requests: int = 0
    events: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    stolen_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)


async def stream_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str,
                      body: bytes) -> tuple[float, int]:
    """One streamed request on a kept-alive connection: (seconds to the first event, events)."""
    start = time.perf_counter()
    writer.write(b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"{path} answered {status!r}")
    while await reader.readline() != b"\r\n":
        pass
    ttft, events = 0.0, 0
    while True:
        size = int(await reader.readline(), 16)
        data = await reader.readexactly(size + 2)
        if not size:
            return ttft, events
        n = data.count(b"data:")
        if n and not events:
            ttft = time.perf_counter() - start
        events += n


async def run_phase(port: int, protocol: str, streams: int, rounds: int, input_len: int,
                    output_len: int) -> Phase:
    """`rounds` requests on each of `streams` connections, each one after the other."""
    from kiln.bench.serve_load import make_prompts, request_for

    prompts = make_prompts(streams * rounds, input_len)
    jobs = iter(range(len(prompts)))
    phase = Phase(protocol)
    conns = [await _open(port) for _ in range(streams)]

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i in jobs:
            path, body = request_for(protocol, MODEL, prompts[i], output_len)
            ttft, events = await stream_once(reader, writer, path, json.dumps(body).encode())
            phase.requests += 1
            phase.events += events
            phase.tokens += output_len
            phase.ttft_s.append(ttft)

    start = time.perf_counter()
    await asyncio.gather(*(worker(r, w) for r, w in conns))
    phase.wall_s = time.perf_counter() - start
    for _, w in conns:
        w.close()
    return phase


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid`, all its threads (not its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stolen_seconds() -> float:
    """CPU time the hypervisor gave to others, all cores (a virtual machine's noise; 0 on bare metal)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
                if b" 200 " in s.recv(100):
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s")


def measure(args: argparse.Namespace, proc: subprocess.Popen, protocol: str) -> Phase:
    asyncio.run(run_phase(args.port, protocol, args.streams, 1, args.input_len, 8))  # warm up
    before, stolen = cpu_seconds(proc.pid), stolen_seconds()
    if args.profile:
        proc.send_signal(signal.SIGUSR1)
    phase = asyncio.run(run_phase(args.port, protocol, args.streams, args.rounds, args.input_len,
                                  args.output_len))
    phase.cpu_s, phase.stolen_s = cpu_seconds(proc.pid) - before, stolen_seconds() - stolen
    if args.profile:
        proc.send_signal(signal.SIGUSR2)
    return phase


def table(phases: list[Phase], args: argparse.Namespace) -> str:
    pace = args.streams / (args.step_ms / 1000)
    lines = [f"{args.streams} streams, one token each {args.step_ms} ms (the fake engine's pace: "
             f"{pace:,.0f} tokens/s), {args.input_len} words in / {args.output_len} tokens out, "
             f"{args.rounds} rounds",
             f"{'protocol':<8} {'events':>7} {'tokens/s':>9} {'of pace':>7} {'server CPU':>10} "
             f"{'of a core':>9} {'us/event':>8} {'ms/req':>6} {'TTFT p50':>9} {'TTFT p90':>9} {'stolen':>6}"]
    for p in phases:
        tps = p.tokens / p.wall_s
        p90 = statistics.quantiles(p.ttft_s, n=10)[8]
        lines.append(f"{p.protocol:<8} {p.events:>7} {tps:>9,.0f} {tps / pace:>7.0%} {p.cpu_s:>9.2f}s "
                     f"{p.cpu_s / p.wall_s:>9.0%} {p.cpu_s / p.events * 1e6:>8.1f} "
                     f"{p.cpu_s / p.requests * 1e3:>6.2f} {statistics.median(p.ttft_s) * 1e3:>7.1f}ms "
                     f"{p90 * 1e3:>7.1f}ms {p.stolen_s / p.wall_s:>6.0%}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=64, help="concurrent requests (the engine's batch)")
    ap.add_argument("--step_ms", type=float, default=7.0, help="the fake engine's step time")
    ap.add_argument("--input_len", type=int, default=128, help="prompt words")
    ap.add_argument("--output_len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="requests per stream, one after the other")
    ap.add_argument("--protocols", default="openai,kserve")
    ap.add_argument("--repeat", type=int, default=1, help="measure each protocol this many times, a row "
                    "each (the figures of a shared machine vary from run to run)")
    ap.add_argument("--profile", default=None, help="write a cProfile of the server's measured phases here")
    ap.add_argument("--top", type=int, default=30, help="with --profile: functions shown")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args)
        return
    args.port = free_port()
    cmd = [sys.executable, __file__, "--serve", "--port", str(args.port), "--streams", str(args.streams),
           "--step_ms", str(args.step_ms)] + (["--profile", args.profile] if args.profile else [])
    proc = subprocess.Popen(cmd)
    try:
        wait_ready(args.port, proc)
        phases = [measure(args, proc, protocol) for _ in range(args.repeat)
                  for protocol in args.protocols.split(",")]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    print(table(phases, args))
    if args.profile:
        import pstats

        pstats.Stats(args.profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
