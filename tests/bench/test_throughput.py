"""kiln bench throughput: the number crunching directly, then a tiny in-flight run on a synthetic model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.bench.lengths import Stats, draw_lengths, percentile
from kiln.bench.synthetic import synthetic_model
from kiln.bench.throughput import (
    RequestTiming,
    build_for,
    check_fits,
    gaps,
    measure_throughput,
    random_prompts,
    summarize,
)
from kiln.config import BuildConfig
from kiln.errors import KilnError, LimitError
from kiln.runtime.engine import LLM

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- pure functions --------------------------------------------------------------------------------

def test_percentiles_interpolate_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert percentile(values, 90) == pytest.approx(4.6)  # numpy.percentile([1..5], 90)
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_stats_of_nothing_is_none_and_of_values_is_ordered() -> None:
    assert Stats.of([]) is None
    s = Stats.of([0.3, 0.1, 0.2])
    assert s is not None and s.count == 3 and s.mean == pytest.approx(0.2)
    assert s.p50 <= s.p90 <= s.p99 <= 0.3


@pytest.mark.parametrize("dist", ["uniform", "normal"])
def test_drawn_lengths_are_seeded_and_bounded(dist: str) -> None:
    a = draw_lengths(500, 100, dist, 0.2, seed=1)
    assert a == draw_lengths(500, 100, dist, 0.2, seed=1)
    assert a != draw_lengths(500, 100, dist, 0.2, seed=2)
    assert len(set(a)) > 10 and all(v >= 1 for v in a)
    assert 90 < sum(a) / len(a) < 110
    if dist == "uniform":
        assert min(a) >= 80 and max(a) <= 120


def test_fixed_lengths_and_clipping_to_one() -> None:
    assert draw_lengths(3, 7, "fixed", 0.5) == [7, 7, 7]
    assert draw_lengths(3, 7, "uniform", 0.0) == [7, 7, 7]
    assert min(draw_lengths(300, 2, "normal", 3.0)) == 1
    assert min(draw_lengths(300, 2, "uniform", 2.0)) == 1


def test_bad_length_settings_are_clear_errors() -> None:
    with pytest.raises(KilnError, match="--len_range -0.1"):
        draw_lengths(3, 7, "uniform", -0.1)
    with pytest.raises(KilnError, match="--input_len_dist 'zipf'.*fixed, uniform, normal"):
        draw_lengths(3, 7, "zipf")


def test_summary_of_known_timings() -> None:
    timings = [
        RequestTiming(10, 5, ttft_s=0.1, latency_s=0.5, gaps_s=(0.1, 0.1, 0.1, 0.1)),
        RequestTiming(20, 5, ttft_s=0.3, latency_s=1.1, gaps_s=(0.2, 0.2, 0.2, 0.2)),
        RequestTiming(30, 1, ttft_s=0.2, latency_s=0.2),  # one token: no time per output token
    ]
    r = summarize(timings, wall_s=2.0)
    assert (r.num_requests, r.input_tokens, r.output_tokens) == (3, 60, 11)
    assert r.output_tokens_per_s == 5.5 and r.total_tokens_per_s == 35.5 and r.requests_per_s == 1.5
    assert r.tpot is not None and r.tpot.count == 2 and r.tpot.mean == pytest.approx(0.15)
    assert r.itl is not None and r.itl.count == 8 and r.itl.p50 == pytest.approx(0.15)
    assert r.ttft is not None and r.ttft.p50 == pytest.approx(0.2)
    lines = r.lines()
    assert lines[0].startswith("3 requests: 60 prompt tokens")
    assert any("5.5 output tokens/s" in line and "35.5 total tokens/s" in line for line in lines)
    data = json.loads(r.to_json(what="test"))
    assert data["what"] == "test" and data["output_tokens_per_s"] == 5.5
    assert data["tpot_s"]["count"] == 2 and set(data["ttft_s"]) == {"count", "mean", "p50", "p90", "p99"}


def test_gaps_and_tpot_of_a_single_token_request() -> None:
    assert gaps([1.0, 1.5, 3.0]) == (0.5, 1.5) and gaps([1.0]) == ()
    assert summarize([RequestTiming(4, 1, 0.1, 0.1)], 1.0).tpot is None
    assert "n/a" in summarize([RequestTiming(4, 1, 0.1, 0.1)], 1.0).lines()[4]


def test_prompts_are_seeded_and_in_the_vocabulary() -> None:
    p = random_prompts([3, 5, 1], vocab_size=50, seed=4)
    assert [len(x) for x in p] == [3, 5, 1] and all(0 <= t < 50 for x in p for t in x)
    assert p == random_prompts([3, 5, 1], vocab_size=50, seed=4)


def test_synthetic_build_covers_the_longest_drawn_request() -> None:
    b = build_for([5, 9, 7], [10, 2, 8], max_batch_size=4)
    assert (b.max_input_len, b.max_seq_len, b.max_batch_size, b.max_num_tokens) == (9, 15, 4, 8192)


def test_lengths_over_an_engines_limits_are_refused_with_both_numbers() -> None:
    build = BuildConfig(max_batch_size=4, max_input_len=8, max_seq_len=12)
    check_fits(build, [8, 4], [4, 8])
    with pytest.raises(LimitError, match="reach 9 tokens.*max_input_len 8.*--max_input_len 9"):
        check_fits(build, [9, 4], [1, 1])
    with pytest.raises(LimitError, match="13 tokens.*max_seq_len 12.*--max_seq_len 13"):
        check_fits(build, [8, 4], [5, 1])


# ---- a real run on the CPU -------------------------------------------------------------------------

def test_every_request_gets_its_full_output_in_flight() -> None:
    inputs, outputs = [8, 6, 8, 5, 8, 7], [4, 4, 3, 4, 2, 4]
    build = build_for(inputs, outputs, max_batch_size=4)
    model, cfg = synthetic_model("smollm2-135m", build, "cpu", "float32")
    llm = LLM.from_model(model, cfg, "cpu")
    r = measure_throughput(llm, random_prompts(inputs, cfg.model.vocab_size), outputs)
    assert r.num_requests == 6 and r.input_tokens == sum(inputs)
    assert r.output_tokens == sum(outputs)  # nobody stopped early: end-of-sequence is ignored
    assert r.output_tokens_per_s > 0 and r.total_tokens_per_s > r.output_tokens_per_s
    assert r.ttft is not None and r.latency is not None and r.itl is not None and r.tpot is not None
    assert r.ttft.count == 6 and r.itl.count == sum(outputs) - 6
    assert 0 < r.ttft.p50 <= r.latency.p50 <= r.wall_s


def test_cli_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "tp.json"
    cmd = [sys.executable, "-m", "kiln", "bench", "throughput", "--synthetic", "smollm2-135m", "--dtype",
           "float32", "--num_requests", "6", "--input_len", "8", "--output_len", "4", "--max_batch_size", "4",
           "--device", "cpu", "--output_json", str(out), "--temperature", "0.8", "--top_p", "0.9"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["num_requests"] == 6 and data["output_tokens"] == 24 and data["output_tokens_per_s"] > 0
    assert data["max_batch_size"] == 4 and data["ttft_s"]["count"] == 6
    assert done.stdout.startswith("kiln bench throughput: synthetic smollm2-135m")
    assert "output tokens/s" in done.stdout
    assert "tokens drawn at temperature 0.8, top_k 0, top_p 0.9" in done.stdout  # drawn: all 24 arrived


def test_cli_refuses_a_bad_sampling_setting_by_name(capsys: pytest.CaptureFixture) -> None:
    from kiln.cli import main

    rc = main(["bench", "throughput", "--synthetic", "smollm2-135m", "--num_requests", "1", "--input_len", "1",
               "--output_len", "1", "--device", "cpu", "--temperature", "0.5", "--top_p", "1.5"])
    assert rc == 1
    assert "top_p 1.5 is invalid: it must be in (0, 1]" in capsys.readouterr().err


def test_cli_refuses_synthetic_only_flags_with_an_engine(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from kiln.cli import main

    with pytest.raises(SystemExit):  # argparse: a source is required
        main(["bench", "throughput", "--num_requests", "1", "--input_len", "1", "--output_len", "1"])
    rc = main(["bench", "throughput", "--engine_dir", str(tmp_path), "--max_batch_size", "8",
               "--num_requests", "1", "--input_len", "1", "--output_len", "1", "--device", "cpu"])
    assert rc == 1
    assert "--max_batch_size only applies with --synthetic" in capsys.readouterr().err


def test_cli_checks_lengths_against_an_engine_before_loading_it(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from kiln.bench.synthetic import SHAPES
    from kiln.builder.device import describe_device
    from kiln.builder.engine_file import EngineConfig, current_versions, save_engine_config
    from kiln.cli import main

    build = BuildConfig(max_batch_size=2, max_input_len=16, max_seq_len=32)
    cfg = EngineConfig(SHAPES["smollm2-135m"], build, "float32", 1, describe_device("cpu"),
                       {"quant_algo": None}, {}, current_versions())
    save_engine_config(tmp_path, cfg)
    (tmp_path / "rank0.safetensors").write_bytes(b"")  # never read: the check comes first
    rc = main(["bench", "throughput", "--engine_dir", str(tmp_path), "--num_requests", "4", "--input_len",
               "16", "--input_len_dist", "uniform", "--output_len", "4", "--device", "cpu"])
    assert rc == 1
    assert "more than the engine's max_input_len 16: lower --input_len" in capsys.readouterr().err
