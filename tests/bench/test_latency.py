"""kiln bench latency on a synthetic model, on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kiln.bench.latency import measure_latency
from kiln.bench.synthetic import SHAPES, synthetic_model
from kiln.config import BuildConfig, SamplingParams
from kiln.errors import KilnError
from kiln.quant.methods import QuantConfig
from kiln.runtime.engine import LLM


def smollm2_bytes(bytes_per_linear_param: float) -> float:
    h, inter, layers, vocab = 576, 1536, 30, 49152
    linear = h * (9 + 2 * 3) * 64 + 9 * 64 * h + 2 * h * inter + inter * h  # qkv, o, gate_up, down
    return vocab * h * 4 + layers * (linear * bytes_per_linear_param + 2 * h * 4) + h * 4


def test_synthetic_model_has_the_real_shapes_and_bytes() -> None:
    build = BuildConfig(max_batch_size=2, max_input_len=16, max_seq_len=32)
    model, cfg = synthetic_model("smollm2-135m", build, "cpu", "float32")
    assert cfg.model == SHAPES["smollm2-135m"]
    llm = LLM.from_model(model, cfg, "cpu")
    result = measure_latency(llm, batch_size=2, input_len=16, output_len=4)
    assert result.weight_bytes == smollm2_bytes(4)
    assert result.ttft_s > 0 and result.tpot_s > 0 and result.copy_gbps > 0
    assert result.decode_tokens_per_s == pytest.approx(2 / result.tpot_s)
    assert any("% of the floor" in line for line in result.lines())


def test_the_measured_prompts_are_not_in_the_prefix_cache() -> None:
    """The warm-up runs the measured shapes on other tokens: the measured first step computes its whole
    prompt (a cached prompt would leave it one token to compute)."""
    build = BuildConfig(max_batch_size=2, max_input_len=48, max_seq_len=64, tokens_per_block=16)
    model, cfg = synthetic_model("smollm2-135m", build, "cpu", "float32")
    llm = LLM.from_model(model, cfg, "cpu")
    found = []
    match = llm.scheduler.blocks.match_prefix
    llm.scheduler.blocks.match_prefix = lambda seq: found.append(match(seq)) or found[-1]
    measure_latency(llm, batch_size=2, input_len=40, output_len=3)
    assert len(found) == 4 and found == [0, 0, 0, 0]  # warm-up and measured run, two prompts each


def test_synthetic_int4_weights_are_a_quarter_of_float32_plus_scales() -> None:
    build = BuildConfig(max_batch_size=1, max_input_len=8, max_seq_len=16)
    model, _ = synthetic_model("smollm2-135m", build, "cpu", "float32", QuantConfig("int4_awq", 64))
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # 0.5 byte per weight + a float32 scale and a uint8 zero per group of 64
    assert nbytes == smollm2_bytes(0.5 + 4 / 64 + 1 / 64)


def test_unknown_synthetic_name_is_a_clear_error() -> None:
    with pytest.raises(KilnError, match="mistral-7b-v0.3"):
        synthetic_model("gpt-5", BuildConfig(), "cpu")


def test_cli_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "lat.json"
    done = subprocess.run([sys.executable, "-m", "kiln", "bench", "latency", "--synthetic", "smollm2-135m",
                           "--dtype", "float32", "--input_len", "8", "--output_len", "3", "--device", "cpu",
                           "--output_json", str(out)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["output_len"] == 3 and data["achieved_gbps"] > 0
    assert data["pdl"] == "off"  # a CPU run: no programmatic dependent launch
    assert "time per output token" in done.stdout and "programmatic dependent launch off" in done.stdout


def test_a_second_stream_while_one_runs_is_refused() -> None:
    from kiln.config import SamplingParams

    build = BuildConfig(max_batch_size=2, max_input_len=8, max_seq_len=16)
    model, cfg = synthetic_model("smollm2-135m", build, "cpu", "float32")
    llm = LLM.from_model(model, cfg, "cpu")
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    first = llm.stream([[1, 2, 3]], params)
    next(first)
    with pytest.raises(KilnError, match="already generating"):
        llm.generate([[4, 5]], params)
    first.close()  # closing the stream frees its sequences
    assert llm.blocks.num_free == llm.blocks.num_blocks
    assert len(llm.generate([[4, 5]], params)[0].output_ids) == 4


def test_synthetic_model_keeps_its_rotary_tables_and_gives_finite_logits() -> None:
    from kiln.layers.rotary import RotaryEmbedding

    build = BuildConfig(max_batch_size=1, max_input_len=8, max_seq_len=16)
    model, cfg = synthetic_model("smollm2-135m", build, "cpu", "float32")
    expected = RotaryEmbedding(cfg.model.head_dim, cfg.model.rope, 16, "cpu")
    assert torch.equal(model.model.rotary.cos, expected.cos) and torch.equal(model.model.rotary.sin, expected.sin)
    llm = LLM.from_model(model, cfg, "cpu")
    seq = llm.make_sequence([1, 2, 3], SamplingParams(max_tokens=1))
    assert llm.blocks.grow(seq, 3)
    logits = llm.runner.run_all_logits([(seq, 3)])
    assert torch.isfinite(logits).all()
