"""Greedy generation through kiln's LLM API equals transformers' greedy `generate`, alone and batched."""

from __future__ import annotations

import pytest
import torch
from model_parity import ALL_VARIANTS, token_ids

from kiln.config import SamplingParams

MAX_TOKENS = 12
PROMPTS = [token_ids(30, 1), token_ids(31, 6), token_ids(32, 19), token_ids(33, 11)]
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


@torch.no_grad()
def hf_greedy(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False
    )
    new = out[0, len(prompt) :].tolist()
    assert len(new) == MAX_TOKENS, "transformers stopped early"
    return new


@pytest.fixture(scope="module")
def hf_outputs(hf_model):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = [hf_greedy(hf_model(name).model, p) for p in PROMPTS]
        return cache[name]

    return get


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_greedy_equals_transformers(hf_model, hf_outputs, name):
    llm = hf_model(name).llm(tokens_per_block=16)
    want = hf_outputs(name)
    for prompt, expected in zip(PROMPTS, want, strict=True):
        (out,) = llm.generate([prompt], GREEDY)
        assert out.output_ids == expected, f"{name}: prompt of {len(prompt)} tokens"
        assert out.finish_reason == "length"
    # A random model that repeats one token would make this comparison weak.
    assert any(len(set(w)) > 2 for w in want), f"{name}: degenerate reference outputs {want}"


@pytest.mark.parametrize("name", ALL_VARIANTS)
@pytest.mark.parametrize("block_size,max_num_tokens", [(1, 8192), (16, 5), (64, 8192)])
def test_batch_equals_each_alone(hf_model, hf_outputs, name, block_size, max_num_tokens):
    """Mixed prompt lengths in one generate call (chunked prefill packed with decodes when
    max_num_tokens is small) give each prompt the tokens it gets alone, which equal transformers'."""
    llm = hf_model(name).llm(tokens_per_block=block_size, max_num_tokens=max_num_tokens)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.prompt_ids for o in outs] == PROMPTS
    alone = [llm.generate([p], GREEDY)[0].output_ids for p in PROMPTS]
    assert [o.output_ids for o in outs] == alone
    assert alone == hf_outputs(name)
