"""`kiln serve` on a synthetic model (random weights of a real model's shapes, a word-level tokenizer
of its vocabulary size), for measuring the server on a GPU without downloading a model.

    python3 benchmarks/serve_synthetic.py --synthetic llama-3.1-8b --max_batch_size 64 --port 8000
    kiln bench serve --url http://127.0.0.1:8000 --concurrency 64 --num_requests 1000 --input_len 128 --output_len 128

The prompts of `kiln bench serve` are words of its list, each one token of this tokenizer.
"""

from __future__ import annotations

import argparse

import uvicorn

from kiln.bench.serve_load import WORDS
from kiln.bench.synthetic import SHAPES, synthetic_model, synthetic_tokenizer
from kiln.builder.device import default_device
from kiln.config import BuildConfig
from kiln.quant.methods import QuantConfig
from kiln.runtime.async_engine import AsyncLLM
from kiln.runtime.engine import LLM
from kiln.runtime.engine_process import EngineSpec, ProcessAsyncLLM
from kiln.runtime.loader import ModelSource
from kiln.serve.app import create_app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", default="llama-3.1-8b")
    ap.add_argument("--qformat", default="full_prec")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max_batch_size", type=int, default=64)
    ap.add_argument("--max_input_len", type=int, default=1024)
    ap.add_argument("--max_seq_len", type=int, default=2048)
    ap.add_argument("--max_num_tokens", type=int, default=8192)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--switch_interval", type=float, default=None, help="sys.setswitchinterval (seconds)")
    ap.add_argument("--engine_thread", action="store_true", help="run the engine in a thread of the server's "
                    "process instead of a process of its own")
    args = ap.parse_args()
    if args.switch_interval:
        import sys

        sys.setswitchinterval(args.switch_interval)
    device = default_device()
    build = BuildConfig(max_batch_size=args.max_batch_size, max_input_len=args.max_input_len,
                        max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens)
    quant = None if args.qformat == "full_prec" else QuantConfig(args.qformat, 0 if args.qformat == "fp8" else 128)
    vocab = SHAPES[args.synthetic].vocab_size
    tokenizer = synthetic_tokenizer(vocab, WORDS)
    if args.engine_thread:
        model, cfg = synthetic_model(args.synthetic, build, device, args.dtype, quant)
        engine = AsyncLLM(LLM.from_model(model, cfg, device, tokenizer=tokenizer))
    else:
        spec = EngineSpec(device, ModelSource(synthetic=args.synthetic, build=build, qformat=args.qformat,
                                             dtype=args.dtype))
        engine = ProcessAsyncLLM(spec, tokenizer=tokenizer)
    app = create_app(engine, args.synthetic)
    try:
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
