"""Tensor parallelism on two GPUs (NCCL, CUDA graphs): a 2-rank engine agrees with the 1-rank one.

A real model, so that the top-1 token means something: SmolLM2-135M, whose 9 query heads and 3 KV
heads do not split over 2 ranks, is first widened to 12 query heads and 4 KV heads by adding heads
whose weights are zero (a zero query attends uniformly to zero values, and zero columns of o_proj
drop the result: the function is unchanged, which the float32 CPU check below confirms). Then it is
converted with --tp_size 1 and 2 and built for the GPU in bfloat16, and teacher-forced over held-out
KJV text (a prefill, then one decode step at a time, replayed from CUDA graphs that hold the
all-reduces): the top-1 token of the two engines must agree at >= 99% of positions.
(One multi-GPU group per process: NCCL groups are not torn down and rebuilt within a process.)
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.builder.build import build_engine
from kiln.checkpoint.convert import convert_hf
from kiln.config import BuildConfig, SamplingParams
from kiln.runtime.engine import LLM
from kiln.runtime.sequence import Sequence

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]

ASSETS = Path(__file__).resolve().parents[2] / ".gpu_assets"
PROMPT, TOTAL = 128, 512
BUILD = BuildConfig(max_batch_size=8, max_input_len=256, max_seq_len=1024, max_num_tokens=2048)


def widen_heads(src: Path, dst: Path, heads: int = 12, kv_heads: int = 4) -> None:
    """Copy a Llama folder with zero-weight query/KV heads added at the end (same function)."""
    cfg = json.loads((src / "config.json").read_text())
    d, h0, kv0 = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    assert heads // kv_heads == h0 // kv0, "each KV head keeps its group of query heads"
    state = load_file(str(src / "model.safetensors"))
    for name in list(state):
        w = state[name]
        if name.endswith("q_proj.weight"):
            state[name] = torch.cat([w, w.new_zeros((heads - h0) * d, w.shape[1])])
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = torch.cat([w, w.new_zeros((kv_heads - kv0) * d, w.shape[1])])
        elif name.endswith("o_proj.weight"):
            state[name] = torch.cat([w, w.new_zeros(w.shape[0], (heads - h0) * d)], dim=1)
    dst.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg.update(num_attention_heads=heads, num_key_value_heads=kv_heads)
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy(f, dst / f.name)


def kjv_ids(tokenizer_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    local = ASSETS / "kjv_eval.txt"
    if local.is_file():
        text = local.read_text()
    else:
        from kiln.quant.calib import kjv_text

        text = kjv_text("eval")
    ids = AutoTokenizer.from_pretrained(str(tokenizer_dir))(text[:20000])["input_ids"]
    assert len(ids) >= TOTAL
    return ids[:TOTAL]


def forced_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Logits at positions PROMPT-1 .. len(ids)-2, feeding the text's next token instead of a sampled one."""
    seq = Sequence(ids[:PROMPT], SamplingParams(max_tokens=len(ids) - PROMPT, temperature=0, ignore_eos=True))
    llm.scheduler.add(seq)
    rows = []
    while not seq.finished:
        batch = llm.scheduler.schedule()
        sampled, logits = llm.runner.run(batch)
        rows.append(logits[0].float().cpu())
        llm.scheduler.update(batch, {seq.seq_id: ids[len(seq)]})
    return torch.stack(rows)


@pytest.fixture(scope="module")
def wide(smollm2_hf, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("tp-gpu")
    widen_heads(smollm2_hf, work / "hf")
    return work / "hf"


def engine(hf: Path, tp: int, dtype: str, device: str) -> Path:
    out = hf.parent / f"engine-{dtype}-tp{tp}-{device}"
    if not out.exists():
        convert_hf(hf, hf.parent / f"ckpt-{dtype}-tp{tp}", dtype=dtype, tp_size=tp)
        build_engine(hf.parent / f"ckpt-{dtype}-tp{tp}", out, BUILD, device=device)
    return out


def test_tp2_top1_agrees_with_tp1_bf16(wide, smollm2_hf):
    ids = kjv_ids(smollm2_hf)
    # The widened model is the same function: float32 CPU logits equal the original's.
    convert_hf(smollm2_hf, wide.parent / "ckpt-orig", dtype="float32")
    build_engine(wide.parent / "ckpt-orig", wide.parent / "engine-orig", BUILD, device="cpu")
    short = ids[: PROMPT + 8]
    orig = forced_logits(LLM(wide.parent / "engine-orig", None, device="cpu"), short)[:4]
    same = forced_logits(LLM(engine(wide, 1, "float32", "cpu"), None, device="cpu"), short)[:4]
    assert (orig - same).abs().max().item() < 1e-3

    kw = dict(device="cuda:0", max_tokens_in_paged_kv_cache=8192)
    one = LLM(engine(wide, 1, "bfloat16", "cuda"), None, **kw)
    assert one.runner.graphs, "decode steps must replay CUDA graphs"
    want = forced_logits(one, ids)
    del one
    gc.collect()
    torch.cuda.empty_cache()
    two = LLM(engine(wide, 2, "bfloat16", "cuda"), None, **kw)
    try:
        assert two.group is not None and two.runner.graphs
        got = forced_logits(two, ids)
    finally:
        two.close()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    text_top1 = (want.argmax(-1) == torch.tensor(ids[PROMPT:TOTAL])).float().mean().item()
    print(f"tp2 vs tp1 bf16 top-1 agreement: {agree:.4f} over {got.shape[0]} positions "
          f"(tp1's top-1 is the text's next token at {text_top1:.3f})")
    assert agree >= 0.99
