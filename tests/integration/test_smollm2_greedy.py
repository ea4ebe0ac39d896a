"""The real SmolLM2-135M-Instruct: kiln's greedy tokens equal transformers' greedy generate."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
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
def engine_dir(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("smollm2")
    convert_hf(smollm2_hf, tmp / "ckpt", "float32")
    build_engine(tmp / "ckpt", tmp / "engine", BuildConfig(max_batch_size=3, max_input_len=64, max_seq_len=128,
                                                           max_num_tokens=256, tokens_per_block=16))
    shutil.rmtree(tmp / "ckpt")  # half a GB each in float32: the suite keeps its disk use small
    yield tmp / "engine"
    shutil.rmtree(tmp)


@pytest.fixture(scope="module")
def llm(engine_dir: Path, smollm2_hf: Path) -> LLM:
    return LLM(engine_dir, smollm2_hf, device="cpu")


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


# A shared 2-block prefix (32 tokens at 16 per block) and different endings.
SHARED = "In the beginning God created the heaven and the earth. And the earth was without form, and void; " \
         "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters."
ENDINGS = [" And God said,", " Then", " The next day"]


def test_prefix_cache_hits_give_the_same_tokens(engine_dir: Path, smollm2_hf: Path) -> None:
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [SHARED + e for e in ENDINGS]
    plain = LLM(engine_dir, smollm2_hf, device="cpu", enable_prefix_caching=False)
    expected = [plain.generate([p], params)[0].output_ids for p in prompts]
    cached = LLM(engine_dir, smollm2_hf, device="cpu")
    got = [cached.generate([p], params)[0].output_ids for p in prompts]  # one by one: later ones hit
    assert got == expected
    shared_blocks = len(cached.encode(SHARED)) // 16
    assert shared_blocks >= 2
    assert cached.blocks.hit_tokens >= 2 * shared_blocks * 16
    assert plain.blocks.hit_tokens == 0
    assert cached.blocks.num_used == 0


def test_preempted_requests_resume_with_the_same_tokens(engine_dir: Path, llm: LLM, smollm2_hf: Path) -> None:
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = [o.output_ids for o in llm.generate(PROMPTS, params)]
    # 7 blocks of 16 tokens: three sequences of up to ~60 tokens cannot all hold their blocks at once.
    tight = LLM(engine_dir, smollm2_hf, device="cpu", num_kv_blocks=7)
    outs = tight.generate(PROMPTS, params)
    assert tight.scheduler.num_preemptions > 0
    assert [o.output_ids for o in outs] == expected
    assert tight.blocks.num_used == 0
