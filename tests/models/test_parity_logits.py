"""kiln's logits equal transformers' (float32) for every family and feature, at every position.

Prefill is checked at every position by calling kiln's model directly with hand-built AttentionMetadata
(one piece or several chunks, a scattered block table); decode is checked through kiln's own scheduler
and model runner with teacher forcing: at every step the sequence gets the next token of a fixed
sequence, and kiln's logits for that step must equal transformers' logits of the full sequence at that
position.
"""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch
from model_parity import (
    ALL_VARIANTS,
    ATOL,
    SEQ_LEN,
    VARIANTS,
    assert_close,
    direct_prefill_logits,
    make_hf_model,
    teacher_forced_logits,
    token_ids,
)

from kiln.checkpoint.convert import convert_hf
from kiln.checkpoint.format import load_config

BLOCK_SIZES = [1, 16, 64]


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_converted_config_has_the_feature(hf_model, name):
    """The checkpoint's ModelConfig says what the HF config switched on (else parity proves nothing)."""
    m = hf_model(name)
    cfg = load_config(m.ckpt_dir).model
    for key, want in VARIANTS[name].expect.items():
        assert getattr(cfg, key) == want, f"{name}: ModelConfig.{key} = {getattr(cfg, key)!r}, expected {want!r}"
    hf = m.model.config
    assert cfg.num_heads == hf.num_attention_heads
    assert cfg.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    rope = hf.rope_parameters
    assert (cfg.rope.rope_type, cfg.rope.theta) == (rope["rope_type"], rope["rope_theta"])
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if key in rope:
            assert getattr(cfg.rope, key) == rope[key], key


@pytest.mark.parametrize("name", ["llama3", "llama-linear", "qwen2"])
def test_legacy_rope_scaling_config(hf_model, tmp_path, name):
    """config.json as transformers 4.x wrote it (most Hub models): `rope_theta` at the top level and
    scaling in `rope_scaling`, with "type" instead of "rope_type" in older files."""
    m = hf_model(name)
    hf = tmp_path / "hf"
    shutil.copytree(m.hf_dir, hf)
    cfg = json.loads((hf / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    if params["rope_type"] != "default":
        params["type"] = params.pop("rope_type")
        cfg["rope_scaling"] = params
    (hf / "config.json").write_text(json.dumps(cfg))
    convert_hf(hf, tmp_path / "ckpt", dtype="float32")
    assert load_config(tmp_path / "ckpt").model.rope == load_config(m.ckpt_dir).model.rope


def test_qwen2_config_without_layer_types(hf_model, tmp_path):
    """Qwen2 config.json files written before transformers had `layer_types` (most on the Hub): the
    layers from max_window_layers up slide."""
    hf = tmp_path / "hf"
    shutil.copytree(hf_model("qwen2-sliding").hf_dir, hf)
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg.pop("layer_types") == ["full_attention", "sliding_attention"]
    (hf / "config.json").write_text(json.dumps(cfg))
    convert_hf(hf, tmp_path / "ckpt", dtype="float32")
    assert load_config(tmp_path / "ckpt").model.sliding_windows == (0, 6)


# Feature switched off -> transformers' logits must move well beyond the tolerance, so that each parity
# test below would fail if kiln ignored the feature.
FEATURE_OFF = {
    "llama3": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "llama-linear": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    "mistral": dict(sliding_window=None),
    "qwen2-sliding": dict(use_sliding_window=False),
    "qwen2": "zero_bias",
    "llama-attn-bias": "zero_bias",
}


@pytest.mark.parametrize("name", list(FEATURE_OFF))
@torch.no_grad()
def test_feature_changes_reference_logits(hf_model, name):
    m = hf_model(name)
    off = FEATURE_OFF[name]
    ref = make_hf_model(name, **({} if off == "zero_bias" else off))
    ref.load_state_dict(m.model.state_dict())  # identical weights; only the feature differs
    if off == "zero_bias":
        for n, p in ref.named_parameters():
            if n.endswith(".bias"):
                p.zero_()
    ids = token_ids(1, SEQ_LEN)
    diff = (m.logits(ids) - ref(input_ids=torch.tensor([ids])).logits[0]).abs().max().item()
    assert diff > 100 * ATOL, f"{name}: switching the feature off moves logits by only {diff:.3g}"


def _scattered_table(llm, num_tokens: int, seed: int) -> list[int]:
    """A block table using non-consecutive, out-of-order blocks of the engine's cache."""
    total = llm.runner.kv_caches[0][0].shape[0]
    need = -(-num_tokens // llm.runner.block_size)
    blocks = list(range(total))
    random.Random(seed).shuffle(blocks)
    return blocks[:need]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_prefill_logits_every_position(hf_model, name, block_size):
    m = hf_model(name)
    llm = m.llm(tokens_per_block=block_size)
    ids = token_ids(2, SEQ_LEN)
    want = m.logits(ids)
    table = _scattered_table(llm, len(ids), seed=block_size)
    got = direct_prefill_logits(llm, ids, [len(ids)], table)
    assert_close(got, want, f"{name} prefill, tokens_per_block {block_size}")
    # The same sequence written in uneven chunks (a cached prefix attended by each later chunk).
    got = direct_prefill_logits(llm, ids, [5, 1, 10, 16], table)
    assert_close(got, want, f"{name} chunked prefill, tokens_per_block {block_size}")


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_decode_logits_through_paged_cache(hf_model, name, block_size):
    """Prefill a 12-token prompt, then 19 decode steps to position 31, through scheduler and runner."""
    m = hf_model(name)
    llm = m.llm(tokens_per_block=block_size)
    ids = token_ids(3, SEQ_LEN)
    prompt_len = 12
    (got,) = teacher_forced_logits(llm, [ids], [prompt_len])
    want = m.logits(ids)[prompt_len - 1 : -1]
    assert got.shape[0] == SEQ_LEN - prompt_len
    assert_close(got[0], want[0], f"{name} prefill last-token logits, tokens_per_block {block_size}")
    assert_close(got[1:], want[1:], f"{name} decode steps, tokens_per_block {block_size}")


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_chunked_prefill_engine(hf_model, name):
    """max_num_tokens 5 < the 23-token prompt: the scheduler prefills it in 5 steps, then decodes."""
    m = hf_model(name)
    llm = m.llm(tokens_per_block=16, max_num_tokens=5)
    ids = token_ids(4, SEQ_LEN)
    prompt_len = 23
    runs = []
    run = llm.runner.run

    def counting_run(batch):
        runs.append([n for _, n in batch])
        return run(batch)

    llm.runner.run = counting_run
    (got,) = teacher_forced_logits(llm, [ids], [prompt_len])
    assert runs[: math.ceil(prompt_len / 5)] == [[5], [5], [5], [5], [3]], runs
    assert_close(got, m.logits(ids)[prompt_len - 1 : -1], f"{name} chunked prefill + decode")


@pytest.mark.parametrize("name", ALL_VARIANTS)
@pytest.mark.parametrize("block_size,max_num_tokens", [(16, 8192), (1, 7), (16, 7)])
def test_mixed_batch_logits(hf_model, name, block_size, max_num_tokens):
    """Sequences of different lengths batched in flight (with max_num_tokens 7, prefill chunks packed
    with decodes) each get transformers' logits of that sequence alone."""
    m = hf_model(name)
    llm = m.llm(tokens_per_block=block_size, max_num_tokens=max_num_tokens)
    seqs = [token_ids(10, 30), token_ids(11, 9), token_ids(12, 21), token_ids(13, 3)]
    prompt_lens = [17, 1, 8, 2]
    got = teacher_forced_logits(llm, seqs, prompt_lens)
    for i, (ids, p, g) in enumerate(zip(seqs, prompt_lens, got, strict=True)):
        assert_close(g, m.logits(ids)[p - 1 : -1], f"{name} batch member {i}")


def test_cache_reuse_does_not_leak(hf_model):
    """A second request on the same engine reuses blocks full of the first one's keys and values."""
    m = hf_model("mistral")
    llm = m.llm(tokens_per_block=16)
    first, second = token_ids(20, SEQ_LEN), token_ids(21, SEQ_LEN)
    teacher_forced_logits(llm, [first], [10])
    (got,) = teacher_forced_logits(llm, [second], [4])
    assert_close(got, m.logits(second)[3:-1], "second request")
    assert llm.blocks.num_free == llm.blocks.num_blocks
