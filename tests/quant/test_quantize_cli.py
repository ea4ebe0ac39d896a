"""Every qformat end to end through the CLI (quantize -> build -> run), and the errors of bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FORMATS = [
    ["--qformat", "full_prec"],
    ["--qformat", "int8_wo"],
    ["--qformat", "int8_wo", "--group_size", "32"],
    ["--qformat", "int4_wo", "--group_size", "64"],
    ["--qformat", "int4_wo"],
    ["--qformat", "int4_awq", "--awq_block_size", "64", "--calib_size", "4", "--calib_max_seq_length", "64"],
    ["--qformat", "fp8", "--calib_size", "4", "--calib_max_seq_length", "64"],  # smoothing and GPTQ
    ["--qformat", "fp8", "--smoothquant", "0", "--fp8_gptq", "disable"],  # round to nearest, no calibration
]


def kiln(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "kiln", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)
    if check:
        assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def tiny_with_tokenizer(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with SmolLM2's vocabulary and tokenizer, so `kiln run` can use text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    folder = tmp_path_factory.mktemp("tiny-tok")
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (smollm2_hf / name).is_file():
            shutil.copy(smollm2_hf / name, folder / name)
    return folder


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: "-".join(a.lstrip("-") for a in f[1::2] if a))
def test_every_format_runs(fmt: list[str], tiny_with_tokenizer: Path, tmp_path: Path) -> None:
    ckpt, engine, out = tmp_path / "ckpt", tmp_path / "engine", tmp_path / "out.json"
    kiln("quantize", "--model_dir", tiny_with_tokenizer, "--output_dir", ckpt, "--dtype", "float32", *fmt)
    config = json.loads((ckpt / "config.json").read_text())
    expected_algo = None if fmt[1] == "full_prec" else fmt[1]
    assert config["quantization"]["quant_algo"] == expected_algo
    kiln("build", "--checkpoint_dir", ckpt, "--output_dir", engine, "--max_input_len", "32", "--max_seq_len", "64")
    kiln("run", "--engine_dir", engine, "--tokenizer_dir", tiny_with_tokenizer, "--input_text", "In the beginning",
         "--max_output_len", "6", "--output_json", out, "--end_id", "-1")
    result = json.loads(out.read_text())["outputs"][0]
    assert len(result["output_token_ids"]) == 6


def test_convert_weight_only_flags_as_in_the_seed(tiny_with_tokenizer: Path, tmp_path: Path) -> None:
    kiln("convert", "--model_dir", tiny_with_tokenizer, "--output_dir", tmp_path / "c", "--dtype", "float16",
         "--per_token", "--per_channel", "--use_weight_only", "--weight_only_precision", "int4")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["quantization"] == {"quant_algo": "int4_wo", "group_size": 0, "bits": 4}
    tensors = load_file(str(tmp_path / "c" / "rank0.safetensors"))
    assert tensors["model.layers.0.mlp.down_proj.qweight"].dtype == torch.uint8
    assert tensors["model.layers.0.mlp.down_proj.qweight"].shape == (128, 128)  # [out, in // 2]


def test_tp2_shards_together_equal_unsharded(tiny_with_tokenizer: Path, tmp_path: Path) -> None:
    for tp in ("1", "2"):
        kiln("quantize", "--model_dir", tiny_with_tokenizer, "--output_dir", tmp_path / f"tp{tp}", "--qformat",
             "int4_wo", "--group_size", "32", "--tp_size", tp, "--dtype", "float32")
    full = load_file(str(tmp_path / "tp1" / "rank0.safetensors"))
    r0 = load_file(str(tmp_path / "tp2" / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "tp2" / "rank1.safetensors"))
    assert set(full) == set(r0) == set(r1)
    for name, tensor in full.items():
        if any(p in name for p in ("o_proj", "down_proj")) and tensor.dim() == 2:
            joined = torch.cat([r0[name], r1[name]], dim=1)  # row-parallel: input columns split
        elif any(p in name for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens")):
            joined = torch.cat([r0[name], r1[name]], dim=0)  # column-parallel / vocabulary rows
        else:
            assert torch.equal(r0[name], r1[name]), name  # replicated
            joined = r0[name]
        assert torch.equal(joined, tensor), name


def test_bad_inputs_say_what_is_wrong(tiny_with_tokenizer: Path, tmp_path: Path) -> None:
    unknown = kiln("quantize", "--model_dir", tiny_with_tokenizer, "--output_dir", tmp_path / "x",
                   "--qformat", "int3", check=False)
    assert unknown.returncode != 0 and "int3" in unknown.stderr and "Traceback" not in unknown.stderr
    # hidden 128 / tp 2 = 64 per rank for o_proj, which a group of 128 does not divide
    block = kiln("quantize", "--model_dir", tiny_with_tokenizer, "--output_dir", tmp_path / "x", "--qformat",
                 "int4_wo", "--group_size", "128", "--tp_size", "2", check=False)
    assert block.returncode == 1 and "group size 128" in block.stderr and "Traceback" not in block.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    calib = kiln("quantize", "--model_dir", tiny_with_tokenizer, "--output_dir", tmp_path / "x", "--qformat",
                 "int4_awq", "--awq_block_size", "32", "--calib_dataset", str(empty), check=False)
    assert calib.returncode == 1 and "no text" in calib.stderr and "Traceback" not in calib.stderr
    assert not (tmp_path / "x").exists()


def test_quantize_eval_and_kiln_eval_report_perplexity(tiny_with_tokenizer: Path, tmp_path: Path) -> None:
    done = kiln("quantize", "--model_dir", tiny_with_tokenizer, "--output_dir", tmp_path / "q", "--qformat",
                "int8_wo", "--dtype", "float32", "--eval", "--eval_tokens", "512")
    line = next(x for x in done.stdout.splitlines() if x.startswith("perplexity"))
    assert "original" in line and "int8_wo" in line and "%" in line
    kiln("build", "--checkpoint_dir", tmp_path / "q", "--output_dir", tmp_path / "e", "--max_input_len", "256",
         "--max_seq_len", "256")
    report = tmp_path / "eval.json"
    done = kiln("eval", "--engine_dir", tmp_path / "e", "--tokenizer_dir", tiny_with_tokenizer, "--max_tokens", "512",
                "--window", "256", "--output_json", report)
    result = json.loads(report.read_text())
    assert result["windows"] == 2 and result["tokens"] == 512
    # a random model is close to uniform over its 49,152 tokens: perplexity in the tens of thousands
    assert 1000 < result["perplexity"] < 1e6
    assert f"{result['perplexity']:.4f}" in done.stdout
    too_long = kiln("eval", "--engine_dir", tmp_path / "e", "--tokenizer_dir", tiny_with_tokenizer, "--window", "512",
                    check=False)
    assert too_long.returncode == 1 and "max_seq_len 256" in too_long.stderr and "Traceback" not in too_long.stderr
