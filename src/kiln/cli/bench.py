"""kiln bench latency: TTFT, time per output token, tokens/s and achieved GB/s against the floor."""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

from kiln.cli.options import positive_int
from kiln.config import DTYPES, QFORMATS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: latency", description="Measure an engine, or a synthetic "
                       "model of a real model's shapes with random weights built on the device.")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    lat = kinds.add_parser("latency", help="one batch: TTFT, time per output token, GB/s vs the floor")
    src = lat.add_mutually_exclusive_group(required=True)
    src.add_argument("--engine_dir", help="an engine folder")
    src.add_argument("--synthetic", help="a model shape: mistral-7b-v0.3, llama-3.1-8b, mistral-nemo-12b, smollm2-135m")
    lat.add_argument("--qformat", default="full_prec", choices=QFORMATS, help="with --synthetic: weight format")
    lat.add_argument("--group_size", type=int, default=128, choices=(0, 32, 64, 128),
                     help="with --synthetic int4/int8: group size (0: per channel; default 128)")
    lat.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="with --synthetic: activation dtype")
    lat.add_argument("--batch_size", type=positive_int, default=1)
    lat.add_argument("--input_len", type=positive_int, default=128)
    lat.add_argument("--output_len", type=positive_int, default=256)
    lat.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible)")
    lat.add_argument("--compare", choices=("hf",), help="hf: also time transformers' generate (static cache) "
                     "on the same shapes in the same run, and print the ratio")
    lat.add_argument("--no_cuda_graphs", action="store_true", help="run decode steps eagerly (for comparison)")
    lat.add_argument("--output_json", help="write the figures as JSON")
    lat.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from kiln.bench.latency import measure_latency
    from kiln.builder.device import default_device
    from kiln.config import BuildConfig
    from kiln.runtime.engine import LLM

    device = args.device or default_device()
    if args.synthetic:
        from kiln.bench.synthetic import synthetic_model
        from kiln.quant.methods import QuantConfig

        build = BuildConfig(max_batch_size=args.batch_size, max_input_len=args.input_len,
                            max_seq_len=args.input_len + args.output_len,
                            max_num_tokens=max(8192, args.batch_size * args.input_len))
        quant = None if args.qformat == "full_prec" else QuantConfig(
            args.qformat, 0 if args.qformat == "fp8" else args.group_size)
        model, cfg = synthetic_model(args.synthetic, build, device, args.dtype, quant)
        llm = LLM.from_model(model, cfg, device, cuda_graphs=not args.no_cuda_graphs)
        what = f"synthetic {args.synthetic}, {args.qformat}, {args.dtype}"
    else:
        model = None
        llm = LLM(args.engine_dir, None, device=device, cuda_graphs=not args.no_cuda_graphs)
        what = f"engine {args.engine_dir}"
    result = measure_latency(llm, args.batch_size, args.input_len, args.output_len)
    print(f"kiln bench latency: {what} on {llm.config.device.get('name')}")
    for line in result.lines():
        print("  " + line)
    hf = None
    if args.compare == "hf":
        from kiln.bench.compare_hf import measure_hf_generate

        model_cfg, dtype = llm.config.model, llm.runner.kv_caches[0][0].dtype
        llm = model = None  # room for the Hugging Face copy
        gc.collect()
        hf = measure_hf_generate(model_cfg, args.batch_size, args.input_len, args.output_len, device, dtype)
        print(f"  transformers generate (static cache): TTFT {hf.ttft_s * 1e3:.2f} ms, "
              f"{hf.tpot_s * 1e3:.3f} ms/token ({hf.decode_tokens_per_s:.1f} tokens/s); kiln is "
              f"{hf.tpot_s / result.tpot_s:.2f}x faster per output token, {hf.ttft_s / result.ttft_s:.2f}x on TTFT")
    if args.output_json:
        from kiln.fsutil import write_atomic

        data = {k: getattr(result, k) for k in result.__dataclass_fields__}
        data.update(decode_tokens_per_s=result.decode_tokens_per_s, achieved_gbps=result.achieved_gbps, what=what)
        if hf is not None:
            data.update(hf_ttft_s=hf.ttft_s, hf_tpot_s=hf.tpot_s)
        write_atomic(Path(args.output_json), json.dumps(data, indent=2) + "\n")
    return 0
