"""kiln quantize: a Hugging Face folder -> a quantized checkpoint (TensorRT-LLM's quantize.py flags)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kiln.cli.options import enable_disable, positive_int
from kiln.config import DTYPES, QFORMATS
from kiln.errors import KilnError
from kiln.quant.defaults import FP8_GPTQ, FP8_SMOOTHQUANT


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a Hugging Face model into a checkpoint (int8/int4 weight-only, int4 AWQ, fp8)",
        description="Write a quantized checkpoint. int8_wo / int4_wo: round-to-nearest weight-only, per "
        "channel or per --group_size. int4_awq: activation-aware int4 with groups of --awq_block_size, "
        "calibrated on --calib_dataset. fp8: e4m3 weights per channel, activations per token at run time; "
        "the weights are rounded by GPTQ calibrated on --calib_dataset (--fp8_gptq), optionally after "
        "SmoothQuant smoothing (--smoothquant). "
        "--eval prints the perplexity of the result next to the original's on held-out text.",
    )
    p.add_argument("--model_dir", required=True, help="Hugging Face model folder")
    p.add_argument("--output_dir", required=True, help="checkpoint folder to write")
    p.add_argument("--qformat", required=True, choices=QFORMATS, help="quantization format")
    p.add_argument("--awq_block_size", type=int, default=128, choices=(32, 64, 128), help="int4_awq group size (default 128)")
    p.add_argument("--group_size", type=int, default=0, choices=(0, 32, 64, 128),
                   help="int8_wo/int4_wo group size; 0 (default) is per output channel")
    p.add_argument("--dtype", default="auto", choices=("auto",) + DTYPES, help="dtype of the unquantized tensors and scales")
    p.add_argument("--tp_size", type=positive_int, default=1, help="tensor-parallel ranks to shard into")
    calib = p.add_argument_group("calibration (int4_awq, fp8)")
    calib.add_argument("--calib_dataset", default="kjv",
                       help="kjv (the King James Bible, offline), a .txt or .jsonl file, or a Hugging Face dataset "
                            "(org/name[:config], or cnn_dailymail, pileval, wikitext)")
    calib.add_argument("--calib_size", type=positive_int, default=None,
                       help="calibration windows (default 512 for int4_awq, 64 for fp8)")
    calib.add_argument("--calib_max_seq_length", type=positive_int, default=512, help="tokens per window (default 512)")
    calib.add_argument("--batch_size", type=positive_int, default=1, help="accepted for compatibility; AWQ runs layer by layer over all windows")
    fp8 = p.add_argument_group("calibrated fp8 (on --calib_dataset; the checkpoint format stays the same)")
    fp8.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA",
                     help="fp8: fold SmoothQuant activation smoothing of strength ALPHA (0..1) into the weights; "
                          f"0 turns it off (default {FP8_SMOOTHQUANT:g})")
    fp8.add_argument("--fp8_gptq", type=enable_disable, default=None, metavar="{enable,disable}",
                     help="fp8: round the weights by GPTQ on the calibration text instead of to nearest "
                          f"(default {'enable' if FP8_GPTQ else 'disable'}); with --smoothquant 0 and "
                          "--fp8_gptq disable, fp8 is plain round-to-nearest without calibration")
    p.add_argument("--device", default=None, help="where calibration runs: cpu or cuda (default: cuda when visible)")
    p.add_argument("--eval", action="store_true", help="print perplexity before and after on held-out KJV text")
    p.add_argument("--eval_tokens", type=positive_int, default=16384,
                   help="held-out tokens for --eval (default 16384, as kiln eval)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from kiln.cli.convert import resolve_dtype
    from kiln.quant.quantize import QuantizeRequest, quantize

    if args.eval and args.tp_size != 1:
        raise KilnError("--eval needs --tp_size 1 (evaluate a single-rank checkpoint)")
    start = time.perf_counter()
    req = QuantizeRequest(
        model_dir=Path(args.model_dir), output_dir=Path(args.output_dir), qformat=args.qformat,
        group_size=args.group_size, awq_block_size=args.awq_block_size,
        dtype=resolve_dtype(args.dtype, Path(args.model_dir)), tp_size=args.tp_size,
        calib_dataset=args.calib_dataset, calib_size=args.calib_size,
        calib_max_seq_length=args.calib_max_seq_length, device=args.device,
        smoothquant=args.smoothquant, fp8_gptq=args.fp8_gptq,
    )
    out = quantize(req)
    print(f"{args.qformat} checkpoint written to {out} in {time.perf_counter() - start:.1f} s")
    if args.eval:
        report_eval(req, out, args.eval_tokens)
    return 0


def report_eval(req, out: Path, tokens: int) -> None:  # noqa: ANN001
    import tempfile

    from kiln.checkpoint.convert import convert_hf
    from kiln.quant.quantize import evaluate_checkpoints

    with tempfile.TemporaryDirectory(prefix="kiln-fp-") as tmp:
        reference = convert_hf(req.model_dir, Path(tmp) / "fp", req.dtype)
        ppl = evaluate_checkpoints({"original": reference, req.qformat: out}, req.model_dir, "kjv", tokens, req.device)
    base, quant = ppl["original"], ppl[req.qformat]
    print(f"perplexity on {tokens} held-out KJV tokens (John): original {base:.3f}, {req.qformat} {quant:.3f} "
          f"({(quant / base - 1) * 100:+.2f}%)")
