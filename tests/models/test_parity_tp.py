"""Tensor parallelism on the CPU (gloo): a 2-rank engine gives the logits of the 1-rank engine.

For each family, the same random Hugging Face model is converted with --tp_size 2 and built; `LLM`
starts the second rank itself (a worker process) and drives both in lockstep. Teacher-forced logits
through the scheduler and the paged cache (prefill, then decode steps) must equal the single-rank
ones in float32, and greedy generation must give identical tokens. llama-linear has one KV head,
fewer than the ranks: it is replicated.
"""

from __future__ import annotations

import pytest
import torch
from model_parity import MAX_SEQ_LEN, SEQ_LEN, assert_close, teacher_forced_logits, token_ids
from safetensors.torch import load_file

from kiln.builder.build import build_engine
from kiln.checkpoint.convert import convert_hf
from kiln.config import BuildConfig, SamplingParams
from kiln.runtime.engine import LLM

FAMILIES = ["llama2", "llama3", "llama-linear", "mistral", "mistral-nemo", "qwen2"]
BUILD = BuildConfig(max_batch_size=4, max_input_len=48, max_seq_len=MAX_SEQ_LEN, tokens_per_block=16)


def tp_engine(m, tp_size: int):
    out = m.work / f"engine-tp{tp_size}"
    if not out.exists():
        convert_hf(m.hf_dir, m.work / f"ckpt-tp{tp_size}", dtype="float32", tp_size=tp_size)
        build_engine(m.work / f"ckpt-tp{tp_size}", out, BUILD, device="cpu")
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_tp2_equals_tp1(hf_model, name):
    m = hf_model(name)
    sequences = [token_ids(seed, SEQ_LEN) for seed in range(3)]
    prompt_lens = [5, 11, 17]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [s[:p] for s, p in zip(sequences, prompt_lens)]

    one = LLM(tp_engine(m, 1), None, device="cpu")
    want = teacher_forced_logits(one, sequences, prompt_lens)
    want_ids = [o.output_ids for o in one.generate(prompts, greedy)]

    two = LLM(tp_engine(m, 2), None, device="cpu")
    try:
        assert two.group is not None and two.group.tp.size == 2
        assert two.model.model.layers[0].self_attn.num_heads == 2  # half of the 4 heads on rank 0
        got = teacher_forced_logits(two, sequences, prompt_lens)
        got_ids = [o.output_ids for o in two.generate(prompts, greedy)]
    finally:
        two.close()
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, f"{name} sequence {i}: tp 2 vs tp 1")
    assert got_ids == want_ids


def test_build_workers_give_the_same_engine(hf_model, tmp_path):
    """`kiln build --workers 2` fuses the ranks side by side; the files equal the one-by-one build, in
    float16 too (each rank's model sets torch's default dtype while it is built: ranks built in threads
    of one process once came out with float32 tensors in a float16 engine)."""
    m = hf_model("llama3")
    convert_hf(m.hf_dir, tmp_path / "ckpt", dtype="float16", tp_size=2)
    build_engine(tmp_path / "ckpt", tmp_path / "serial", BUILD, device="cpu")
    build_engine(tmp_path / "ckpt", tmp_path / "parallel", BUILD, device="cpu", workers=2)
    for rank in range(2):
        one = load_file(str(tmp_path / "serial" / f"rank{rank}.safetensors"))
        two = load_file(str(tmp_path / "parallel" / f"rank{rank}.safetensors"))
        assert one.keys() == two.keys()
        assert all(one[k].dtype == two[k].dtype and one[k].equal(two[k]) for k in one)
        assert {t.dtype for t in two.values()} == {torch.float16}
