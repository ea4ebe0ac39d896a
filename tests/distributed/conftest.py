"""A tiny random Llama with SmolLM2's tokenizer, as 1-rank and 2-rank engines, for the launch tests.

One KV head (multi-query): with 2 ranks it is replicated, the case where KV heads are fewer than ranks.
The tokenizer is real, so `kiln run --input_text` and `kiln serve` work as a user runs them; the weights
are random, so the text is nonsense, but the same nonsense on 1 and 2 ranks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kiln.builder.build import build_engine
from kiln.checkpoint.convert import convert_hf
from kiln.config import BuildConfig
from kiln.runtime.tokenizer import tokenizer_files

BUILD = BuildConfig(max_batch_size=4, max_input_len=64, max_seq_len=256, max_num_tokens=256, tokens_per_block=16)


@pytest.fixture(scope="session")
def tp_model(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    work = tmp_path_factory.mktemp("tp-model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                      initializer_range=0.5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    hf = work / "hf"
    LlamaForCausalLM(cfg).save_pretrained(str(hf))
    for f in tokenizer_files(smollm2_hf):
        shutil.copy(f, hf / f.name)
    out = {"hf": hf}
    for tp in (1, 2):
        convert_hf(hf, work / f"ckpt{tp}", dtype="float32", tp_size=tp)
        build_engine(work / f"ckpt{tp}", work / f"engine{tp}", BUILD, device="cpu")
        out[f"engine{tp}"] = work / f"engine{tp}"
    return out


def tp_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMIX_", "PMI_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", KILN_TP_TIMEOUT_S="30",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    env.update(extra)
    return env


def kiln_script() -> str:
    """The `kiln` console script of this environment (what torchrun and mpirun are given)."""
    path = Path(sys.executable).parent / "kiln"
    if not path.exists():
        pytest.skip(f"no kiln script beside {sys.executable}")
    return str(path)


def children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


def run(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=kw.pop("env", tp_env()), **kw)
