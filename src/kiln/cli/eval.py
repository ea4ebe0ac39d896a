"""kiln eval: perplexity of an engine on held-out text."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kiln.cli.options import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity of an engine on held-out text",
                       description="Perplexity over non-overlapping windows of the text (default: the Gospel "
                       "of John from the King James Bible, which calibration never uses).")
    p.add_argument("--engine_dir", required=True, help="engine folder")
    p.add_argument("--tokenizer_dir", required=True, help="tokenizer folder")
    p.add_argument("--dataset", default="kjv", help="kjv, or a .txt / .jsonl file")
    p.add_argument("--max_tokens", type=positive_int, default=16384, help="tokens to evaluate (default 16384)")
    p.add_argument("--window", type=window_size, default=512, help="tokens per window, at least 2 (default 512)")
    p.add_argument("--output_json", help="write the result as JSON")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible)")
    p.set_defaults(func=main)


def window_size(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{value} is invalid: a window needs at least 2 tokens (one to predict)")
    return value


def main(args: argparse.Namespace) -> int:
    from kiln.fsutil import write_atomic
    from kiln.quant.calib import load_text, token_windows
    from kiln.runtime.engine import LLM
    from kiln.runtime.evaluate import perplexity

    llm = LLM(args.engine_dir, args.tokenizer_dir, device=args.device)
    windows = token_windows(llm.tokenizer, load_text(args.dataset, "eval"), max(1, args.max_tokens // args.window),
                            args.window, "--dataset")
    start = time.perf_counter()
    ppl = perplexity(llm, windows)
    elapsed = time.perf_counter() - start
    tokens = sum(len(w) for w in windows)
    print(f"perplexity {ppl:.4f} over {tokens} tokens ({len(windows)} windows of {args.window}) "
          f"in {elapsed:.1f} s ({tokens / elapsed:.0f} tokens/s)")
    if args.output_json:
        report = {"perplexity": ppl, "tokens": tokens, "windows": len(windows), "window": args.window,
                  "dataset": args.dataset, "engine_dir": str(Path(args.engine_dir)), "seconds": round(elapsed, 2)}
        write_atomic(Path(args.output_json), json.dumps(report, indent=2) + "\n")
    return 0
