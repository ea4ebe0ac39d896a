"""Shared by the quality modules: quantize SmolLM2-135M in several formats and measure perplexity."""

from __future__ import annotations

import shutil
from pathlib import Path

from kiln.quant.quantize import QuantizeRequest, evaluate_checkpoints, quantize


def perplexities(hf: Path, tmp: Path, formats: dict[str, dict], eval_tokens: int) -> dict[str, float]:
    """{format name: perplexity on `eval_tokens` held-out KJV tokens}; each name is a --qformat, its
    dict the QuantizeRequest's other fields. Checkpoints are float32 and deleted afterwards."""
    try:
        ckpts = {name: quantize(QuantizeRequest(model_dir=hf, output_dir=tmp / name, qformat=name,
                                                dtype="float32", device="cpu", **extra))
                 for name, extra in formats.items()}
        return evaluate_checkpoints(ckpts, hf, "kjv", eval_tokens, "cpu")
    finally:
        shutil.rmtree(tmp)  # about 0.3 GB a checkpoint
