"""fp8's quality bar on the real SmolLM2-135M: within 2% of full precision on 16,384 held-out KJV tokens.

The bar is checked on the text BENCHMARKS.md measures it on, 16,384 tokens (32 windows of 512 from
John): on the first 2,048 alone its cost reads higher (+2.10% against +1.60% on 8,192 and +1.56% on
16,384, the same checkpoint), too noisy a sample for a 2% bar. fp8 is kiln's default recipe (GPTQ
rounding) calibrated on 16 windows of 512 tokens. Measured (2-core CPU, 2026-12-07): full 17.552, fp8
17.826 (+1.56%). The calibration and GPTQ take about 90 s on 2 idle cores, the two evaluations about 70 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .quality import perplexities as measure

pytestmark = pytest.mark.slow
EVAL_TOKENS = 16384
FORMATS = {"full_prec": {}, "fp8": {"calib_size": 16}}


@pytest.fixture(scope="module")
def perplexities(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    return measure(smollm2_hf, tmp_path_factory.mktemp("quality-fp8"), FORMATS, EVAL_TOKENS)


def test_fp8_within_two_percent(perplexities: dict[str, float]) -> None:
    # GPTQ rounding measures +1.56% here (BENCHMARKS.md: +1.62% with 64 calibration windows).
    assert 15 < perplexities["full_prec"] < 25
    assert perplexities["fp8"] / perplexities["full_prec"] < 1.02
