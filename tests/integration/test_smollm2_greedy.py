"""The real SmolLM2-135M-Instruct: kiln's greedy tokens equal transformers' greedy generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.builder.build import build_engine
from kiln.checkpoint.convert import convert_hf
from kiln.config import BuildConfig, SamplingParams
from kiln.runtime.engine import LLM

PROMPTS = [
    "The capital of France is",
    "In the beginning God created the heaven and the earth. And the earth was",
    "def fibonacci(n):",
]
NEW_TOKENS = 32

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> LLM:
    tmp = tmp_path_factory.mktemp("smollm2")
    convert_hf(smollm2_hf, tmp / "ckpt", "float32")
    build_engine(tmp / "ckpt", tmp / "engine", BuildConfig(max_batch_size=3, max_input_len=64, max_seq_len=128,
                                                           max_num_tokens=256, tokens_per_block=16))
    return LLM(tmp / "engine", smollm2_hf, device="cpu")


@pytest.fixture(scope="module")
def reference(smollm2_hf: Path, llm: LLM) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_hf), dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([llm.encode(prompt)])
        gen = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=2)
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


def test_greedy_equals_transformers_one_by_one(llm: LLM, reference: list[list[int]]) -> None:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    for prompt, expected in zip(PROMPTS, reference):
        (out,) = llm.generate([prompt], params)
        assert out.output_ids == expected, prompt


def test_mixed_length_batch_equals_each_alone(llm: LLM, reference: list[list[int]]) -> None:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    assert [o.output_ids for o in outs] == reference
    assert all(len(o.output_ids) == NEW_TOKENS and o.finish_reason == "length" for o in outs)


def test_chat_answer_mentions_paris(llm: LLM) -> None:
    from kiln.cli.run import chat_prompt

    ids = chat_prompt(llm.tokenizer, "What is the capital of France?")
    (out,) = llm.generate([ids], SamplingParams(max_tokens=24, temperature=0))
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ended on <|im_end|>, which is not in the text
    assert "<|im_end|>" not in out.text
