"""kiln convert: a Hugging Face folder (or a GGUF file) -> a kiln checkpoint."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from kiln.cli.options import positive_int
from kiln.config import DTYPES
from kiln.errors import KilnError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a Hugging Face model (or GGUF file) into a kiln checkpoint",
        description="Write a checkpoint folder (config.json + rank{i}.safetensors) from a Hugging Face "
        "model folder or a GGUF file. Written atomically: an interrupted run leaves nothing behind.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model_dir", help="Hugging Face model folder (config.json + *.safetensors)")
    src.add_argument("--gguf", help="a GGUF file; it is dequantized, and its tokenizer saved in the checkpoint")
    p.add_argument("--output_dir", required=True, help="checkpoint folder to write")
    p.add_argument(
        "--dtype", default="auto", choices=("auto",) + DTYPES,
        help="weight dtype of the checkpoint; auto takes the model's own (float16 if it names none)",
    )
    p.add_argument("--tp_size", type=positive_int, default=1, help="tensor-parallel ranks to shard into")
    wo = p.add_argument_group("weight-only quantization (round-to-nearest; `kiln quantize` has AWQ and fp8)")
    wo.add_argument("--use_weight_only", action="store_true", help="quantize the linear weights")
    wo.add_argument("--weight_only_precision", choices=("int8", "int4"), default="int8", help="bits (default int8)")
    wo.add_argument("--per_channel", action="store_true", help="one scale per output channel (the default)")
    wo.add_argument("--group_size", type=int, choices=(0, 32, 64, 128), default=0,
                    help="one scale per group of input columns; 0 (default) is per channel")
    wo.add_argument("--per_token", action="store_true",
                    help="per-token activation scales: weight-only formats keep activations in float; accepted")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from kiln.fsutil import require_dir

    # The inputs first: a wrong path is reported at once, before the model code loads.
    if args.model_dir:
        require_dir(args.model_dir, "--model_dir")
    elif not Path(args.gguf).is_file():
        raise KilnError(f"--gguf {args.gguf}: no such file")
    from kiln.checkpoint.convert import convert_hf
    from kiln.quant.methods import QuantConfig
    from kiln.runtime.tokenizer import tokenizer_files

    start = time.perf_counter()
    if args.per_channel and args.group_size:
        raise KilnError(f"--per_channel and --group_size {args.group_size} contradict each other: give one")
    quant = QuantConfig(f"{args.weight_only_precision}_wo", args.group_size) if args.use_weight_only else None
    if args.gguf:
        from kiln.checkpoint.gguf import gguf_to_hf

        with tempfile.TemporaryDirectory(prefix="kiln-gguf-") as tmp:
            hf_dir = gguf_to_hf(args.gguf, Path(tmp) / "hf")
            dtype = resolve_dtype(args.dtype, hf_dir)
            out = convert_hf(hf_dir, args.output_dir, dtype, args.tp_size, tokenizer_files(hf_dir), quant)
    else:
        dtype = resolve_dtype(args.dtype, Path(args.model_dir))
        out = convert_hf(args.model_dir, args.output_dir, dtype, args.tp_size, quant=quant)
    from kiln.checkpoint.format import load_config

    written = load_config(out).quantization  # what the checkpoint holds (an AutoAWQ folder: int4_awq)
    algo, group = written.get("quant_algo"), written.get("group_size")
    what = f"{dtype}, {algo} group {group or 'per-channel'}" if algo else dtype
    print(f"checkpoint written to {out} ({what}, tp_size {args.tp_size}) in {time.perf_counter() - start:.1f} s")
    return 0


def resolve_dtype(dtype: str, model_dir: Path) -> str:
    if dtype != "auto":
        return dtype
    import json

    try:
        hf = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "float16"  # convert_hf reports the real problem with the folder
    own = hf.get("dtype") or hf.get("torch_dtype") or "float16"
    if own not in DTYPES:
        raise KilnError(f"--dtype auto: the model's dtype {own!r} is not one of {', '.join(DTYPES)}; pass --dtype")
    return own
