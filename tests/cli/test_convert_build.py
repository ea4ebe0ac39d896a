"""`kiln convert` (from a Hugging Face folder and from a GGUF file) and `kiln build` with a seed's flags."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open

from .conftest import (
    MAX_BATCH_SIZE,
    MAX_INPUT_LEN,
    MAX_NUM_TOKENS,
    MAX_SEQ_LEN,
    SEED_BUILD_FLAGS,
    Artifacts,
    check_ok,
    kiln,
)

pytestmark = pytest.mark.slow

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tensor_names(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def test_convert_from_model_dir(artifacts: Artifacts, checkpoint: Path) -> None:
    proc = artifacts.convert.result()
    assert f"checkpoint written to {checkpoint} (float32, tp_size 1)" in proc.stdout
    assert sorted(p.name for p in checkpoint.iterdir()) == ["config.json", "rank0.safetensors"]
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["format"] == "kiln-checkpoint/1"
    assert config["architecture"] == "LlamaForCausalLM"
    assert config["dtype"] == "float32"
    assert config["mapping"] == {"world_size": 1, "tp_size": 1}
    assert config["model"]["num_layers"] == 30 and config["model"]["vocab_size"] == 49152
    names = tensor_names(checkpoint / "rank0.safetensors")
    assert "model.embed_tokens.weight" in names
    assert "model.layers.29.self_attn.q_proj.weight" in names
    assert "lm_head.weight" not in names  # SmolLM2 ties its embeddings


def test_convert_from_gguf(artifacts: Artifacts, checkpoint: Path) -> None:
    """The GGUF checkpoint holds the tokenizer too, and the same weights as the one converted from the
    Hugging Face folder (itself made from that GGUF file)."""
    proc = check_ok(artifacts.convert_gguf.result())
    gguf_ckpt = artifacts.gguf_checkpoint_dir
    assert f"checkpoint written to {gguf_ckpt} (float32, tp_size 1)" in proc.stdout  # dtype auto: the GGUF's
    names = {p.name for p in gguf_ckpt.iterdir()}
    assert {"config.json", "rank0.safetensors", *TOKENIZER_FILES} <= names
    assert json.loads((gguf_ckpt / "config.json").read_text())["format"] == "kiln-checkpoint/1"
    with safe_open(str(gguf_ckpt / "rank0.safetensors"), framework="pt") as a, \
            safe_open(str(checkpoint / "rank0.safetensors"), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        for name in a.keys():
            assert a.get_tensor(name).equal(b.get_tensor(name)), name


def test_build_with_every_seed_flag(artifacts: Artifacts, engine: Path) -> None:
    proc = artifacts.build.result()
    assert f"engine written to {engine}" in proc.stdout
    assert (
        f"max_batch_size {MAX_BATCH_SIZE}, max_input_len {MAX_INPUT_LEN}, max_seq_len {MAX_SEQ_LEN}, "
        f"max_num_tokens {MAX_NUM_TOKENS}, tokens_per_block 64"
    ) in proc.stdout
    assert sorted(p.name for p in engine.iterdir()) == ["engine.json", "rank0.safetensors"]
    names = tensor_names(engine / "rank0.safetensors")
    assert "model.layers.0.self_attn.qkv_proj.weight" in names  # the runtime layout: q, k, v fused
    assert "model.layers.0.mlp.gate_up_proj.weight" in names


def test_engine_json_records_limits_device_versions_and_flags(engine: Path) -> None:
    import torch

    import kiln

    cfg = json.loads((engine / "engine.json").read_text())
    assert cfg["format"] == "kiln-engine/1"
    assert cfg["build"] == {
        "max_batch_size": MAX_BATCH_SIZE, "max_input_len": MAX_INPUT_LEN, "max_seq_len": MAX_SEQ_LEN,
        "max_num_tokens": MAX_NUM_TOKENS, "tokens_per_block": 64,
    }
    expected_type = "cuda" if torch.cuda.is_available() else "cpu"
    assert cfg["device"]["type"] == expected_type and cfg["device"]["name"]
    assert cfg["versions"]["kiln"] == kiln.__version__
    assert cfg["versions"]["torch"] == torch.__version__
    assert cfg["versions"]["python"]
    assert cfg["dtype"] == "float32"
    assert cfg["flags"] == {
        "paged_kv_cache": True, "use_fused_mlp": True, "remove_input_padding": True, "context_fmha": True,
        "use_paged_context_fmha": True, "enable_xqa": True, "paged_state": False,
        "gather_all_token_logits": True, "gemm_plugin": "float16", "gpt_attention_plugin": "float16",
        "logits_dtype": "float16", "profiling_verbosity": "none", "workers": 4,
    }


def test_build_help_mentions_every_seed_flag() -> None:
    proc = check_ok(kiln("build", "--help"))
    flags = {arg for arg in SEED_BUILD_FLAGS if arg.startswith("--")} | {"--checkpoint_dir", "--output_dir"}
    missing = [flag for flag in sorted(flags) if flag not in proc.stdout]
    assert not missing, f"`kiln build --help` does not mention {missing}"


def test_help_lists_the_commands() -> None:
    proc = check_ok(kiln("--help"))
    assert proc.stdout.startswith("usage: kiln")
    for command in ("convert", "build", "run", "quickstart"):
        assert re.search(rf"^    {command}\b", proc.stdout, re.M), command
