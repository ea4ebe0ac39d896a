"""The fast path end to end: the whole model through kiln's Triton kernels (rotary + cache write, paged
prefill and decode attention, RMSNorm, SiLU-and-mul) in Triton's interpreter, against transformers.

The same teacher-forced, in-flight batches as test_parity_logits, with chunked prefill packed beside
decodes, so the kernels see the metadata the model runner really builds.
"""

from __future__ import annotations

import os

import pytest
import torch
from model_parity import assert_close, teacher_forced_logits, token_ids

from kiln.kernels import force_triton

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def _triton_kernels():
    if os.environ.get("TRITON_INTERPRET") != "1":  # a GPU machine: tests/gpu covers the kernels there
        pytest.skip("runs the Triton kernels on CPU tensors, which needs Triton's interpreter")
    old = force_triton(True)
    yield
    force_triton(old)


@pytest.mark.parametrize("name", ["llama3", "mistral", "mistral-nemo", "qwen2-sliding", "llama-attn-bias"])
@pytest.mark.parametrize("block_size,max_num_tokens", [(16, 8192), (8, 7)])
def test_mixed_batch_logits_through_kernels(hf_model, name, block_size, max_num_tokens):
    m = hf_model(name)
    llm = m.llm(tokens_per_block=block_size, max_num_tokens=max_num_tokens)
    assert llm.runner.fast
    seqs = [token_ids(10, 30), token_ids(11, 9), token_ids(12, 21), token_ids(13, 3)]
    prompt_lens = [17, 1, 8, 2]
    got = teacher_forced_logits(llm, seqs, prompt_lens)
    for i, (ids, p, g) in enumerate(zip(seqs, prompt_lens, got, strict=True)):
        assert_close(g, m.logits(ids)[p - 1 : -1], f"{name} batch member {i} (Triton kernels)")


def test_kernels_are_really_used(hf_model, monkeypatch):
    """Guard against a silent fallback: break the decode kernel and the fast path must fail."""
    import kiln.kernels.decode_attention as decode

    m = hf_model("llama3")
    llm = m.llm(tokens_per_block=16)

    def broken(q, *args, **kwargs):
        return torch.zeros_like(q)

    monkeypatch.setattr(decode, "paged_decode_attention", broken)
    ids = token_ids(10, 20)
    (got,) = teacher_forced_logits(llm, [ids], [10])
    assert (got - m.logits(ids)[9:-1]).abs().max().item() > 1e-2


@pytest.mark.parametrize("qformat,group", [("int4_awq", 32), ("int4_wo", 0), ("int8_wo", 0), ("fp8", 0)])
def test_quantized_formats_through_kernels(hf_model, tmp_path, qformat, group):
    """Each weight format's Triton matmul inside the whole model gives the logits of its reference path
    (dequantize, then matmul) on the same checkpoint, in float16 (fp8 in float32: its activation rounding
    to e4m3 turns float16's rounding differences between the two paths into 1/16 steps)."""
    from kiln.builder.build import build_engine
    from kiln.checkpoint.convert import convert_hf
    from kiln.config import BuildConfig
    from kiln.quant.methods import QuantConfig
    from kiln.runtime.engine import LLM

    m = hf_model("llama3")
    dtype = "float32" if qformat == "fp8" else "float16"
    convert_hf(m.hf_dir, tmp_path / "ckpt", dtype=dtype, quant=QuantConfig(qformat, group))
    build_engine(tmp_path / "ckpt", tmp_path / "engine", BuildConfig(max_batch_size=4, max_input_len=48,
                                                                      max_seq_len=64, tokens_per_block=16))
    seqs, prompt_lens = [token_ids(10, 24), token_ids(11, 9)], [13, 1]
    force_triton(False)
    want = teacher_forced_logits(LLM(tmp_path / "engine", device="cpu"), seqs, prompt_lens)
    force_triton(True)
    got = teacher_forced_logits(LLM(tmp_path / "engine", device="cpu"), seqs, prompt_lens)
    for g, w in zip(got, want, strict=True):
        scale = w.abs().max().item()
        assert (g - w).abs().max().item() <= 2e-2 * scale, f"{qformat}: Triton path differs from its reference"


def test_decode_graph_only_for_sequences_at_their_last_token(hf_model):
    """A one-token prompt chunk (token budget exhausted) must not go through a decode graph, which
    samples every row; a real decode step must."""
    from kiln.config import SamplingParams
    from kiln.runtime.sequence import Sequence

    force_triton(False)
    llm = hf_model("llama3").llm(tokens_per_block=16)
    replayed = []
    llm.runner.graphs = {4: None}  # as if captured; _replay is replaced below
    llm.runner._replay = lambda size, host: replayed.append(size) or torch.zeros(size, 160)
    seq = Sequence(token_ids(3, 6), SamplingParams(max_tokens=2))
    llm.blocks.grow(seq, 8)
    sampled, _ = llm.runner.run([(seq, 1)])  # position 0 of a 6-token prompt
    assert replayed == [] and sampled == []
    seq.num_computed = 5
    sampled, logits = llm.runner.run([(seq, 1)])  # the prompt's last token: a decode-shaped step
    assert replayed == [4] and sampled == [seq] and logits.shape == (1, 160)  # bucket 4, one row used
