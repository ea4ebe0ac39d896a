"""A quick look at a 2-rank start on GPUs: a small random Llama, tp 2, eager then with CUDA graphs.

    KILN_TP_DEBUG=1 python3 benchmarks/tp_smoke.py /tmp/tp-smoke
Prints each stage with its time; used to find where a group that does not start is stuck.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from kiln.builder.build import build_engine
from kiln.checkpoint.convert import convert_hf
from kiln.config import BuildConfig, SamplingParams
from kiln.runtime.engine import LLM


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tp-smoke")
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[smoke {time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(str(work / "hf"))
    build = BuildConfig(max_batch_size=4, max_input_len=64, max_seq_len=128, max_num_tokens=256)
    for tp in (1, 2):
        convert_hf(work / "hf", work / f"ckpt{tp}", dtype="bfloat16", tp_size=tp)
        build_engine(work / f"ckpt{tp}", work / f"engine{tp}", build, device="cuda")
    say("engines built")
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    ref = LLM(work / "engine1", None, device="cuda:0", max_tokens_in_paged_kv_cache=4096)
    want = [o.output_ids for o in ref.generate(prompts, params)]
    del ref
    say(f"tp1 {want}")
    for graphs in (False, True):
        llm = LLM(work / "engine2", None, device="cuda:0", max_tokens_in_paged_kv_cache=4096, cuda_graphs=graphs)
        say(f"tp2 loaded (graphs {graphs})")
        got = [o.output_ids for o in llm.generate(prompts, params)]
        say(f"tp2 graphs={graphs} {got} same={got == want}")
        llm.close()
        say("closed")


if __name__ == "__main__":
    main()
