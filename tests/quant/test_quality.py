"""Quality bars of int8_wo and fp8 on the real SmolLM2-135M, held-out KJV text (John).

fp8's bar is checked on the text BENCHMARKS.md measures it on, 16,384 tokens (32 windows of 512): on the
first 2,048 alone its cost reads higher (+2.10% against +1.60% on 8,192 and +1.56% on 16,384, the same
checkpoint), too noisy a sample for a 2% bar. int8_wo's bar and the int4 check have room to spare and
use 2,048 tokens. int4_awq's bar needs a calibration run of several minutes on a CPU and is measured by
benchmarks/quant_quality.py (BENCHMARKS.md). fp8 is kiln's default recipe (GPTQ rounding) calibrated on
16 windows of 512 tokens. Measured (2-core CPU, 2026-12-07): on 16,384 tokens full 17.552, fp8 17.826
(+1.56%); on 2,048 full 16.72, int8_wo 16.76 (+0.3%), int4_wo g64 29.83. The fp8 calibration and GPTQ
take about 90 s on 2 idle cores, the 16,384-token evaluations about 70 s.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kiln.quant.quantize import QuantizeRequest, evaluate_checkpoints, quantize

pytestmark = pytest.mark.slow
EVAL_TOKENS = 2048
FP8_EVAL_TOKENS = 16384


@pytest.fixture(scope="module")
def perplexities(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    tmp = tmp_path_factory.mktemp("quality")
    formats = {"full_prec": {}, "int8_wo": {}, "fp8": {"calib_size": 16}, "int4_wo": {"group_size": 64}}
    ckpts = {}
    for name, extra in formats.items():
        req = QuantizeRequest(model_dir=smollm2_hf, output_dir=tmp / name, qformat=name, dtype="float32",
                              device="cpu", **extra)
        ckpts[name] = quantize(req)
    try:
        short = evaluate_checkpoints({k: ckpts[k] for k in ("full_prec", "int8_wo", "int4_wo")}, smollm2_hf,
                                     "kjv", EVAL_TOKENS, "cpu")
        long = evaluate_checkpoints({k: ckpts[k] for k in ("full_prec", "fp8")}, smollm2_hf, "kjv",
                                    FP8_EVAL_TOKENS, "cpu")
    finally:
        shutil.rmtree(tmp)  # four checkpoints, about a GB
    return {**short, "full_prec_long": long["full_prec"], "fp8": long["fp8"]}


def test_full_precision_is_a_sane_language_model(perplexities: dict[str, float]) -> None:
    assert 10 < perplexities["full_prec"] < 25


def test_int8_weight_only_within_one_percent(perplexities: dict[str, float]) -> None:
    assert perplexities["int8_wo"] / perplexities["full_prec"] < 1.01


def test_fp8_within_two_percent(perplexities: dict[str, float]) -> None:
    # The bar, on 16,384 tokens: GPTQ rounding measures +1.56% here (BENCHMARKS.md: +1.62% with
    # 64 calibration windows).
    assert 15 < perplexities["full_prec_long"] < 25
    assert perplexities["fp8"] / perplexities["full_prec_long"] < 1.02


def test_int4_round_to_nearest_costs_more_than_int8(perplexities: dict[str, float]) -> None:
    assert perplexities["int4_wo"] > perplexities["int8_wo"] * 1.2
