"""Tensor parallelism on two GPUs (NCCL, CUDA graphs): a 2-rank engine agrees with the 1-rank one.

A random Llama of moderate size (GQA, untied head) is converted with --tp_size 1 and 2 and built for
the GPU in bfloat16. Teacher-forced over 256 positions of several sequences (a prefill, then one decode
step at a time, replayed from CUDA graphs that hold the all-reduces), the top-1 token of the two
engines must agree at >= 99% of positions; in float32 on the same GPUs, the logits must match closely.
"""

from __future__ import annotations

import gc
import random

import pytest
import torch

from kiln.builder.build import build_engine
from kiln.checkpoint.convert import convert_hf
from kiln.config import BuildConfig, SamplingParams
from kiln.runtime.engine import LLM
from kiln.runtime.sequence import Sequence

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]

VOCAB, PROMPT, TOTAL = 32000, 64, 256
BUILD = BuildConfig(max_batch_size=8, max_input_len=256, max_seq_len=512, max_num_tokens=2048)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1024,
                      initializer_range=0.05, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("tp-gpu") / "hf"
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    return folder


def engine(hf_dir, tp: int, dtype: str):
    work = hf_dir.parent
    out = work / f"engine-{dtype}-tp{tp}"
    if not out.exists():
        convert_hf(hf_dir, work / f"ckpt-{dtype}-tp{tp}", dtype=dtype, tp_size=tp)
        build_engine(work / f"ckpt-{dtype}-tp{tp}", out, BUILD, device="cuda")
    return out


def forced_logits(llm: LLM, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Logits at positions PROMPT-1 .. TOTAL-2 of each sequence, through the scheduler and the runner
    (one prefill, then decode steps), feeding the given next token instead of a sampled one."""
    params = SamplingParams(max_tokens=TOTAL - PROMPT, temperature=0, ignore_eos=True)
    seqs = [Sequence(s[:PROMPT], params) for s in sequences]
    full = {q.seq_id: s for q, s in zip(seqs, sequences)}
    got: dict[int, list[torch.Tensor]] = {q.seq_id: [] for q in seqs}
    for q in seqs:
        llm.scheduler.add(q)
    while not all(q.finished for q in seqs):
        batch = llm.scheduler.schedule()
        sampled, logits = llm.runner.run(batch)
        forced = {}
        for q, row in zip(sampled, logits):
            got[q.seq_id].append(row.float().cpu())
            forced[q.seq_id] = full[q.seq_id][len(q)]
        llm.scheduler.update(batch, forced)
    return [torch.stack(got[q.seq_id]) for q in seqs]


def run_both(hf_dir, dtype: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    rng = random.Random(0)
    sequences = [[rng.randrange(VOCAB) for _ in range(TOTAL)] for _ in range(4)]
    kw = dict(device="cuda:0", max_tokens_in_paged_kv_cache=8192)
    one = LLM(engine(hf_dir, 1, dtype), None, **kw)
    assert one.runner.graphs, "decode steps must replay CUDA graphs"
    want = forced_logits(one, sequences)
    del one
    gc.collect()
    torch.cuda.empty_cache()
    two = LLM(engine(hf_dir, 2, dtype), None, **kw)
    try:
        assert two.group is not None and two.runner.graphs
        got = forced_logits(two, sequences)
    finally:
        two.close()
    return got, want


def test_tp2_top1_agrees_with_tp1_bf16(hf_dir):
    got, want = run_both(hf_dir, "bfloat16")
    same = sum(int((g.argmax(-1) == w.argmax(-1)).sum()) for g, w in zip(got, want))
    total = sum(g.shape[0] for g in got)
    print(f"tp2 vs tp1 bf16 top-1 agreement: {same}/{total} = {same / total:.4f}")
    assert same / total >= 0.99
