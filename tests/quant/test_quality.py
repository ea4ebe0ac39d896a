"""Quality bars of int8_wo and int4_awq on the real SmolLM2-135M, held-out KJV text (John): 2,048 tokens.

int8_wo's and int4_awq's bars have room to spare on 2,048 tokens (fp8's bar, closer, is checked on
16,384 in test_quality_fp8.py). int4_awq (block size 64) is calibrated on 4 windows of 512 tokens here,
to keep its layer-by-layer search to a few minutes of one core; BENCHMARKS.md has the figure for 16
windows (57% of round-to-nearest's gap closed, on 8,192 tokens). Measured (2-core CPU, 2026-12-07): full
16.72, int8_wo 16.76 (+0.3%), int4_wo g64 29.83, int4_awq g64 21.667 (62% of the gap closed; 148 s for
its calibration, search and evaluation on 2 idle cores).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .quality import perplexities as measure

pytestmark = pytest.mark.slow
EVAL_TOKENS = 2048
FORMATS = {"full_prec": {}, "int8_wo": {}, "int4_wo": {"group_size": 64},
           "int4_awq": {"awq_block_size": 64, "calib_size": 4}}


@pytest.fixture(scope="module")
def perplexities(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    return measure(smollm2_hf, tmp_path_factory.mktemp("quality"), FORMATS, EVAL_TOKENS)


def test_full_precision_is_a_sane_language_model(perplexities: dict[str, float]) -> None:
    assert 10 < perplexities["full_prec"] < 25


def test_int8_weight_only_within_one_percent(perplexities: dict[str, float]) -> None:
    assert perplexities["int8_wo"] / perplexities["full_prec"] < 1.01


def test_int4_round_to_nearest_costs_more_than_int8(perplexities: dict[str, float]) -> None:
    assert perplexities["int4_wo"] > perplexities["int8_wo"] * 1.2


def test_int4_awq_closes_the_round_to_nearest_gap(perplexities: dict[str, float]) -> None:
    # The bar: AWQ at block size 64 closes at least 30% of the gap between round-to-nearest
    # int4 (group 64) and full precision; the goal, checked here, is 50%.
    full, rtn, awq = perplexities["full_prec"], perplexities["int4_wo"], perplexities["int4_awq"]
    closed = (rtn - awq) / (rtn - full)
    assert closed >= 0.5, f"AWQ closed {closed:.0%} of the round-to-nearest gap ({full:.2f} / {rtn:.2f} / {awq:.2f})"
