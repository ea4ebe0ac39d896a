"""kiln bench: latency (one batch: TTFT, time per output token, GB/s against the floor), throughput (many
requests batched in flight, as trtllm-bench measures it) and serve (load on a running `kiln serve`)."""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.cli.options import non_negative_float, non_negative_int, positive_int, seed_int
from kiln.config import DTYPES, QFORMATS

if TYPE_CHECKING:
    from kiln.runtime.engine import LLM

SYNTHETIC_NAMES = "mistral-7b-v0.3, llama-3.1-8b, mistral-nemo-12b, smollm2-135m"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: latency, throughput, serve",
                       description="Measure an engine, a synthetic model of a real model's shapes with "
                       "random weights built on the device, or a running `kiln serve`.")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    lat = kinds.add_parser("latency", help="one batch: TTFT, time per output token, GB/s vs the floor")
    src = lat.add_mutually_exclusive_group(required=True)
    src.add_argument("--engine_dir", help="an engine folder")
    src.add_argument("--synthetic", help="a model shape: mistral-7b-v0.3, llama-3.1-8b, mistral-nemo-12b, smollm2-135m")
    lat.add_argument("--qformat", default="full_prec", choices=QFORMATS, help="with --synthetic: weight format")
    lat.add_argument("--group_size", type=int, default=128, choices=(0, 32, 64, 128),
                     help="with --synthetic int4/int8: group size (0: per channel; default 128)")
    lat.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="with --synthetic: activation dtype")
    lat.add_argument("--tp_size", type=positive_int, default=1,
                     help="with --synthetic: tensor-parallel ranks, one per GPU (an engine says its own)")
    lat.add_argument("--batch_size", type=positive_int, default=1)
    lat.add_argument("--input_len", type=positive_int, default=128)
    lat.add_argument("--output_len", type=positive_int, default=256)
    lat.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible)")
    lat.add_argument("--compare", choices=("hf",), help="hf: also time transformers' generate (static cache) "
                     "on the same shapes in the same run, and print the ratio")
    lat.add_argument("--no_cuda_graphs", action="store_true", help="run decode steps eagerly (for comparison)")
    lat.add_argument("--output_json", help="write the figures as JSON")
    lat.set_defaults(func=main)
    add_throughput_parser(kinds)
    add_serve_parser(kinds)


def main(args: argparse.Namespace) -> int:
    from kiln.bench.latency import measure_latency
    from kiln.builder.device import default_device
    from kiln.config import BuildConfig
    from kiln.runtime.engine import LLM

    device = args.device or default_device()
    if args.synthetic:
        build = BuildConfig(max_batch_size=args.batch_size, max_input_len=args.input_len,
                            max_seq_len=args.input_len + args.output_len,
                            max_num_tokens=max(8192, args.batch_size * args.input_len))
        llm = LLM.from_source(_synthetic_source(args, build), device, cuda_graphs=not args.no_cuda_graphs)
        what = f"synthetic {args.synthetic}, {args.qformat}, {args.dtype}"
    else:
        _no_tp_flag(args)
        llm = LLM(args.engine_dir, None, device=device, cuda_graphs=not args.no_cuda_graphs)
        what = f"engine {args.engine_dir}"
    result = measure_latency(llm, args.batch_size, args.input_len, args.output_len)
    pdl = "off"
    if str(device).startswith("cuda"):
        from kiln.kernels.pdl import state

        pdl = state(device)
    print(f"kiln bench latency: {what} on {_ranks(llm)}; programmatic dependent launch {pdl}")
    for line in result.lines():
        print("  " + line)
    hf = None
    if args.compare == "hf":
        from kiln.bench.compare_hf import measure_hf_generate

        if llm.config.tp_size > 1:
            from kiln.errors import KilnError

            raise KilnError("--compare hf runs transformers on one GPU: use it with --tp_size 1")
        model_cfg, dtype = llm.config.model, llm.runner.kv_caches[0][0].dtype
        llm = None  # room for the Hugging Face copy
        gc.collect()
        hf = measure_hf_generate(model_cfg, args.batch_size, args.input_len, args.output_len, device, dtype)
        print(f"  transformers generate (static cache): TTFT {hf.ttft_s * 1e3:.2f} ms, "
              f"{hf.tpot_s * 1e3:.3f} ms/token ({hf.decode_tokens_per_s:.1f} tokens/s); kiln is "
              f"{hf.tpot_s / result.tpot_s:.2f}x faster per output token, {hf.ttft_s / result.ttft_s:.2f}x on TTFT")
    if args.output_json:
        from kiln.fsutil import write_atomic

        data = {k: getattr(result, k) for k in result.__dataclass_fields__}
        data.update(decode_tokens_per_s=result.decode_tokens_per_s, achieved_gbps=result.achieved_gbps, what=what,
                    pdl=pdl)
        if hf is not None:
            data.update(hf_ttft_s=hf.ttft_s, hf_tpot_s=hf.tpot_s)
        write_atomic(Path(args.output_json), json.dumps(data, indent=2) + "\n")
    return 0


# ---- kiln bench throughput -------------------------------------------------------------------------

def add_throughput_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "throughput", help="many requests batched in flight: tokens/s, requests/s, TTFT and per-token times",
        description="Offline throughput as trtllm-bench measures it: --num_requests prompts of random token "
        "ids, end-of-sequence ignored (every request produces its full output length), all submitted at "
        "once and batched in flight. A short warm-up runs first and is not counted.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--engine_dir", help="an engine folder (its build limits must hold the drawn lengths)")
    src.add_argument("--synthetic", help=f"a model shape: {SYNTHETIC_NAMES}")
    p.add_argument("--qformat", default="full_prec", choices=QFORMATS, help="with --synthetic: weight format")
    p.add_argument("--group_size", type=int, default=128, choices=(0, 32, 64, 128),
                   help="with --synthetic int4/int8: group size (0: per channel; default 128)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="with --synthetic: activation dtype")
    p.add_argument("--tp_size", type=positive_int, default=1,
                   help="with --synthetic: tensor-parallel ranks, one per GPU (an engine says its own)")
    p.add_argument("--num_requests", type=positive_int, required=True, help="how many requests")
    p.add_argument("--input_len", type=positive_int, required=True,
                   help="prompt tokens (the mean when drawn)")
    p.add_argument("--output_len", type=positive_int, required=True,
                   help="output tokens (the mean when drawn)")
    p.add_argument("--input_len_dist", default="fixed", choices=("fixed", "uniform", "normal"),
                   help="prompt lengths: fixed, uniform in [L*(1-r), L*(1+r)], or normal with standard "
                   "deviation L*r, clipped to >= 1 (r: --len_range; default fixed)")
    p.add_argument("--output_len_dist", default="fixed", choices=("fixed", "uniform", "normal"),
                   help="output lengths, drawn the same way (default fixed)")
    p.add_argument("--len_range", type=non_negative_float, default=0.2,
                   help="r of the length distributions (default 0.2: +-20%%)")
    p.add_argument("--max_batch_size", type=positive_int, default=None,
                   help="with --synthetic: most requests in flight (default 512)")
    p.add_argument("--max_num_tokens", type=positive_int, default=None,
                   help="with --synthetic: most tokens per step; longer prompts are prefilled in chunks "
                   "(default 8192)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0,
                   help="how tokens are chosen: 0 (default, as trtllm-bench) takes the argmax; more draws")
    p.add_argument("--top_k", type=non_negative_int, default=0, help="with --temperature: top-k (0: off)")
    p.add_argument("--top_p", type=float, default=1.0, help="with --temperature: nucleus mass (1: off)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the prompts and lengths (default 0)")
    p.add_argument("--output_json", help="write the figures as JSON")
    p.set_defaults(func=throughput_main)


def throughput_main(args: argparse.Namespace) -> int:
    import torch

    from kiln.bench.lengths import describe_lengths, draw_lengths
    from kiln.bench.throughput import measure_throughput, random_prompts
    from kiln.builder.device import default_device
    from kiln.config import SamplingParams
    from kiln.errors import KilnError

    # checked before anything loads (SamplingParams names the field and its limit)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    device = args.device or default_device()
    input_lens = draw_lengths(args.num_requests, args.input_len, args.input_len_dist, args.len_range,
                              args.seed, "--input_len")
    output_lens = draw_lengths(args.num_requests, args.output_len, args.output_len_dist, args.len_range,
                               args.seed, "--output_len")
    try:
        if args.synthetic:
            llm, what = _synthetic_llm(args, device, input_lens, output_lens)
        else:
            llm, what = _engine_llm(args, device, input_lens, output_lens)
        prompts = random_prompts(input_lens, llm.config.model.vocab_size, args.seed)
        result = measure_throughput(llm, prompts, output_lens, sampling)
    except torch.OutOfMemoryError:
        raise KilnError(
            f"out of device memory on {device}, with requests of up to "
            f"{max(i + o for i, o in zip(input_lens, output_lens))} tokens: lower --max_batch_size or "
            "--max_num_tokens (with --engine_dir: rebuild the engine with smaller limits), shorten "
            "--input_len/--output_len, or choose a smaller --synthetic model or --qformat"
        ) from None
    build = llm.config.build
    print(f"kiln bench throughput: {what} on {_ranks(llm)}")
    chosen = ("greedy" if sampling.greedy else
              f"drawn at temperature {sampling.temperature}, top_k {sampling.top_k}, top_p {sampling.top_p}")
    print(f"  tokens {chosen}")
    print(f"  max_batch_size {build.max_batch_size}, max_num_tokens {build.max_num_tokens}; input_len "
          f"{describe_lengths(args.input_len, args.input_len_dist, args.len_range)}, output_len "
          f"{describe_lengths(args.output_len, args.output_len_dist, args.len_range)}, seed {args.seed}")
    blocks = llm.blocks
    print(f"  KV cache {blocks.num_blocks} blocks of {blocks.block_size} tokens; "
          f"{llm.scheduler.num_preemptions} preemptions")
    for line in result.lines():
        print("  " + line)
    if args.output_json:
        from kiln.fsutil import write_atomic

        settings = dict(what=what, device=llm.config.device.get("name"), max_batch_size=build.max_batch_size,
                        max_num_tokens=build.max_num_tokens, input_len=args.input_len,
                        output_len=args.output_len, input_len_dist=args.input_len_dist,
                        output_len_dist=args.output_len_dist, len_range=args.len_range, seed=args.seed,
                        kv_blocks=blocks.num_blocks, tokens_per_block=blocks.block_size,
                        preemptions=llm.scheduler.num_preemptions)
        write_atomic(Path(args.output_json), result.to_json(**settings))
    return 0


def _synthetic_llm(args: argparse.Namespace, device: str, input_lens: list[int],
                   output_lens: list[int]) -> tuple[LLM, str]:
    """A random-weight model of the shape --synthetic names, built for the drawn lengths."""
    from kiln.bench.throughput import build_for
    from kiln.runtime.engine import LLM

    build = build_for(input_lens, output_lens, args.max_batch_size or 512, args.max_num_tokens or 8192)
    llm = LLM.from_source(_synthetic_source(args, build), device)
    return llm, f"synthetic {args.synthetic}, {args.qformat}, {args.dtype}"


def _synthetic_source(args: argparse.Namespace, build: object):  # noqa: ANN202 - a ModelSource
    from kiln.bench.synthetic import check_split
    from kiln.runtime.loader import ModelSource

    check_split(args.synthetic, args.tp_size)  # before any rank starts
    return ModelSource(synthetic=args.synthetic, build=build, qformat=args.qformat, dtype=args.dtype,
                       synthetic_tp_size=args.tp_size, group_size=args.group_size)


def _no_tp_flag(args: argparse.Namespace) -> None:
    if args.tp_size != 1:
        from kiln.errors import KilnError

        raise KilnError(f"--tp_size {args.tp_size} applies with --synthetic: an engine has the ranks it was "
                        "built with (kiln convert/quantize --tp_size, then kiln build)")


def _ranks(llm: LLM) -> str:
    """The device, and how many of it when the model is spread over several."""
    name, n = llm.config.device.get("name"), llm.config.tp_size
    return f"{name} x {n} (tensor parallel; figures are for the whole group, per GPU where said)" if n > 1 else str(name)


def _engine_llm(args: argparse.Namespace, device: str, input_lens: list[int],
                output_lens: list[int]) -> tuple[LLM, str]:
    """The engine in --engine_dir, after checking that the drawn lengths fit its build limits."""
    from kiln.bench.throughput import check_fits
    from kiln.builder.engine_file import load_engine_config
    from kiln.errors import KilnError
    from kiln.runtime.engine import LLM

    given = [f"--{k}" for k in ("max_batch_size", "max_num_tokens") if getattr(args, k) is not None]
    if given:
        verb = "apply" if len(given) > 1 else "applies"
        raise KilnError(f"{' and '.join(given)} only {verb} with --synthetic: an engine's limits are fixed "
                        "when it is built; rebuild it with `kiln build` to change them")
    _no_tp_flag(args)
    check_fits(load_engine_config(args.engine_dir).build, input_lens, output_lens)  # before loading weights
    llm = LLM(args.engine_dir, None, device=device)
    return llm, f"engine {args.engine_dir}"


# ---- kiln bench serve ------------------------------------------------------------------------------

def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 is invalid: it must be more than 0")
    return value


def add_serve_parser(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "serve", help="load on a running `kiln serve`: requests/s, TTFT and inter-chunk latency over HTTP",
        description="A load generator for a running `kiln serve`: streaming requests at a fixed concurrency "
        "or as Poisson arrivals at a request rate, timed on the client. Prompts are random words from a "
        "fixed list of common English words, each about one token, so --input_len words are about "
        "--input_len tokens. Failed requests are counted by HTTP status (the first body of each is shown).")
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="the server (default http://127.0.0.1:8000)")
    p.add_argument("--protocol", default="openai", choices=("openai", "kserve"),
                   help="openai: POST /v1/completions; kserve: POST /v2/models/NAME/generate_stream "
                   "(default openai)")
    p.add_argument("--model", help="model name (default: the first one GET /v1/models lists)")
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--concurrency", type=positive_int,
                      help="C workers, each sending one request after another")
    load.add_argument("--request_rate", type=positive_float,
                      help="R requests/s arriving as a Poisson process (exponential gaps), with no limit on "
                      "how many are in flight")
    p.add_argument("--num_requests", type=positive_int, required=True, help="how many requests")
    p.add_argument("--input_len", type=positive_int, required=True,
                   help="prompt length in words (approximate tokens: the words are about one token each)")
    p.add_argument("--output_len", type=positive_int, required=True,
                   help="max_tokens of each request (end-of-sequence ignored where the protocol allows)")
    p.add_argument("--api_key", help="sent as `Authorization: Bearer KEY`")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the prompts and arrival times (default 0)")
    p.add_argument("--timeout", type=positive_float, default=300.0,
                   help="seconds a request may wait for the server (to connect, or between chunks) before "
                   "it counts as failed (default 300)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="client processes sharing the load (default 1); at thousands of streamed tokens "
                   "per second one Python process is CPU-bound and would measure itself")
    p.add_argument("--output_json", help="write the figures as JSON")
    p.set_defaults(func=serve_main)


def serve_main(args: argparse.Namespace) -> int:
    from kiln.bench.serve_load import make_prompts, run_load_processes
    from kiln.errors import KilnError

    prompts = make_prompts(args.num_requests, args.input_len, args.seed)
    result, model = run_load_processes(args.workers, args.url, args.protocol, prompts, args.output_len,
                                       model=args.model, concurrency=args.concurrency,
                                       request_rate=args.request_rate, api_key=args.api_key, seed=args.seed,
                                       timeout_s=args.timeout)
    load = (f"concurrency {args.concurrency}" if args.concurrency is not None
            else f"Poisson arrivals at {args.request_rate:g} requests/s")
    print(f"kiln bench serve: {args.protocol} at {args.url}, model {model}, {load}")
    print(f"  prompts of {args.input_len} words, max_tokens {args.output_len}, seed {args.seed}")
    for line in result.lines():
        print("  " + line)
    if args.output_json:
        from kiln.fsutil import write_atomic

        settings = dict(url=args.url, protocol=args.protocol, model=model, concurrency=args.concurrency,
                        request_rate=args.request_rate, workers=args.workers, input_len_words=args.input_len,
                        output_len=args.output_len, seed=args.seed)
        write_atomic(Path(args.output_json), result.to_json(**settings))
    if result.completed == 0:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(result.failures.items()))
        raise KilnError(f"every request failed ({counts}); the first error of each kind is shown above")
    return 0
