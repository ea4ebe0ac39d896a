"""`kiln quantize`: a Hugging Face folder -> a quantized checkpoint, optionally with its perplexity cost.

Round-to-nearest formats (int8_wo, int4_wo) quantize each weight as it streams through; int4_awq and
fp8 (unless its recipe is turned off) first run the calibration text through the model layer by layer
(quant/awq.py, quant/fp8.py).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kiln.builder.device import default_device
from kiln.checkpoint.autoawq import prequantized_config
from kiln.checkpoint.convert import convert_hf, read_hf_config, write_checkpoint
from kiln.config import QFORMATS
from kiln.errors import KilnError
from kiln.fsutil import require_dir
from kiln.quant.defaults import FP8_GPTQ, FP8_SMOOTHQUANT
from kiln.quant.methods import QuantConfig

# Calibration windows by default: AWQ's search wants many; fp8's GPTQ met its bar with 64 (BENCHMARKS.md),
# and each window is a forward pass of every layer, so 64 keeps a CPU run to minutes.
CALIB_SIZE = {"int4_awq": 512, "fp8": 64}


@dataclass(frozen=True)
class QuantizeRequest:
    model_dir: Path
    output_dir: Path
    qformat: str
    group_size: int = 0
    awq_block_size: int = 128
    dtype: str = "float16"
    tp_size: int = 1
    calib_dataset: str = "kjv"
    calib_size: int | None = None  # None: CALIB_SIZE of the format
    calib_max_seq_length: int = 512
    device: str | None = None
    smoothquant: float | None = None  # fp8 only; None: defaults.FP8_SMOOTHQUANT
    fp8_gptq: bool | None = None  # fp8 only; None: defaults.FP8_GPTQ

    def quant_config(self) -> QuantConfig:
        if self.qformat not in QFORMATS:
            raise KilnError(f"--qformat {self.qformat!r} is unknown: choose one of {', '.join(QFORMATS)}")
        for flag, value in (("--smoothquant", self.smoothquant), ("--fp8_gptq", self.fp8_gptq)):
            if value is not None and self.qformat != "fp8":
                shown = value if flag == "--smoothquant" else ("enable" if value else "disable")
                raise KilnError(f"{flag} {shown} applies to --qformat fp8 only, not {self.qformat}: drop it "
                                "(int4_awq searches its own activation-aware scales)")
        if self.qformat == "full_prec":
            return QuantConfig()
        if self.qformat == "int4_awq":
            return QuantConfig("int4_awq", self.awq_block_size)
        if self.qformat == "fp8":
            from kiln.quant.fp8 import check_smoothquant

            alpha = FP8_SMOOTHQUANT if self.smoothquant is None else self.smoothquant
            check_smoothquant(alpha)
            return QuantConfig("fp8", 0, smoothquant=alpha, gptq=FP8_GPTQ if self.fp8_gptq is None else self.fp8_gptq)
        return QuantConfig(self.qformat, self.group_size)


def quantize(req: QuantizeRequest) -> Path:
    model_dir = require_dir(req.model_dir, "--model_dir")
    quant = req.quant_config()
    if prequantized_config(model_dir) is not None:  # convert_hf imports it, or refuses re-quantizing it
        return convert_hf(model_dir, req.output_dir, req.dtype, req.tp_size, quant=quant)
    calibrated = quant.algo == "int4_awq" or (quant.algo == "fp8" and (quant.smoothquant or quant.gptq))
    if not calibrated:
        return convert_hf(model_dir, req.output_dir, req.dtype, req.tp_size, quant=quant)
    cfg = read_hf_config(model_dir)
    calib = _calibration_windows(req, model_dir)
    device = req.device or default_device()
    if quant.algo == "int4_awq":
        from kiln.quant.awq import awq_transform

        tensors = awq_transform(model_dir, cfg, calib, quant.group_size, device=device)
        recipe = "AWQ"
    else:
        from kiln.quant.fp8 import fp8_transform

        tensors = fp8_transform(model_dir, cfg, calib, quant.smoothquant or 0.0, quant.gptq, device=device)
        recipe = " + ".join(r for r, on in ((f"SmoothQuant {quant.smoothquant:g}", quant.smoothquant),
                                              ("GPTQ", quant.gptq)) if on)
    source = f"{model_dir.resolve()} ({time.strftime('%Y-%m-%d %H:%M:%S')}), {recipe} on {req.calib_dataset}"
    return write_checkpoint(cfg, tensors, req.output_dir, req.dtype, req.tp_size, quant,
                            source=source, where=f"--model_dir {model_dir}")


def _calibration_windows(req: QuantizeRequest, model_dir: Path) -> list:
    from kiln.quant.calib import load_text, token_windows
    from kiln.runtime.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    text = load_text(req.calib_dataset, "calib")
    size = req.calib_size or CALIB_SIZE.get(req.qformat, 512)
    calib = token_windows(tokenizer, text, size, req.calib_max_seq_length, "--calib_dataset")
    print(f"calibrating on {len(calib)} windows of {req.calib_max_seq_length} tokens from {req.calib_dataset}")
    return calib


def evaluate_checkpoints(
    checkpoints: dict[str, Path], tokenizer_dir: Path, dataset: str, max_tokens: int, device: str | None = None
) -> dict[str, float]:
    """Perplexity of each checkpoint (built into a temporary engine) on the held-out text."""
    from kiln.builder.build import build_engine
    from kiln.config import BuildConfig
    from kiln.quant.calib import load_text, token_windows
    from kiln.runtime.engine import LLM
    from kiln.runtime.evaluate import perplexity

    device = device or default_device()
    window = 512
    limits = BuildConfig(max_batch_size=1, max_input_len=window, max_seq_len=window, max_num_tokens=window)
    results = {}
    with tempfile.TemporaryDirectory(prefix="kiln-eval-") as tmp:
        for name, ckpt in checkpoints.items():
            engine = Path(tmp) / name
            build_engine(ckpt, engine, limits, device)
            llm = LLM(engine, tokenizer_dir, device=device)
            windows = token_windows(llm.tokenizer, load_text(dataset, "eval"), max(1, max_tokens // window), window,
                                    "--dataset")
            results[name] = perplexity(llm, windows)
            del llm
    return results
