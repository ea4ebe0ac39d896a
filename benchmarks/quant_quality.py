"""Perplexity of every qformat on SmolLM2-135M-Instruct, KJV held-out text (John).

    python benchmarks/quant_quality.py [--eval_tokens 16384] [--calib_size 64] [--device cpu|cuda] [--json OUT]
        [--formats full_prec int8_wo fp8 fp8_rtn int4_wo_g64 int4_awq_g64]

Prints a table (format, perplexity, change versus full precision, and for int4_awq the share of the
round-to-nearest gap it closes). Calibration text is every book but John; evaluation is John.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from kiln.assets import smollm2_hf_dir
from kiln.quant.quantize import QuantizeRequest, evaluate_checkpoints, quantize

FORMATS = {
    "full_prec": {"qformat": "full_prec"},
    "int8_wo": {"qformat": "int8_wo"},
    "fp8": {"qformat": "fp8"},  # kiln's default recipe (GPTQ rounding, calibrated)
    "fp8_rtn": {"qformat": "fp8", "smoothquant": 0.0, "fp8_gptq": False},  # plain round to nearest
    "int4_wo_g64": {"qformat": "int4_wo", "group_size": 64},
    "int4_awq_g64": {"qformat": "int4_awq", "awq_block_size": 64},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval_tokens", type=int, default=16384)
    ap.add_argument("--calib_size", type=int, default=64)
    ap.add_argument("--calib_max_seq_length", type=int, default=512)
    ap.add_argument("--device", default=None)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    hf = smollm2_hf_dir()
    results: dict[str, float] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="kiln-quality-") as tmp:
        for name in args.formats:
            start = time.perf_counter()
            req = QuantizeRequest(model_dir=hf, output_dir=Path(tmp) / name, dtype="float32",
                                  calib_size=args.calib_size, calib_max_seq_length=args.calib_max_seq_length,
                                  device=args.device, **FORMATS[name])
            ckpt = quantize(req)
            results.update(evaluate_checkpoints({name: ckpt}, hf, "kjv", args.eval_tokens, args.device))
            seconds[name] = time.perf_counter() - start
            print(f"{name}: perplexity {results[name]:.3f} ({seconds[name]:.0f} s)", flush=True)
    print(report(results, args.eval_tokens))
    if args.json:
        Path(args.json).write_text(json.dumps({"perplexity": results, "seconds": seconds, "args": vars(args)}, indent=2))
    return 0


def report(ppl: dict[str, float], tokens: int) -> str:
    base = ppl.get("full_prec")
    lines = [f"SmolLM2-135M-Instruct, KJV John, {tokens} tokens in 512-token windows", "| format | perplexity | vs full precision |", "| --- | --- | --- |"]
    for name, value in ppl.items():
        delta = f"{(value / base - 1) * 100:+.2f}%" if base else "-"
        lines.append(f"| {name} | {value:.3f} | {delta} |")
    if base and "int4_wo_g64" in ppl and "int4_awq_g64" in ppl:
        closed = (ppl["int4_wo_g64"] - ppl["int4_awq_g64"]) / (ppl["int4_wo_g64"] - base)
        lines.append(f"int4_awq closes {closed * 100:.0f}% of the round-to-nearest gap (group 64)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
