"""A user's mistake gives one clear error line on stderr and a non-zero exit, never a traceback.

Every case's command starts together (a few at a time, in the background) when the first test needs
one; each test checks one case's error line for the numbers, names and advice it must hold.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from .conftest import MAX_INPUT_LEN, MAX_SEQ_LEN, Background, check_user_error

pytestmark = pytest.mark.slow

CUDA_DEVICE = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "total_memory_gib": 79.1}
GARBAGE = b"this is not a safetensors file\n" * 8
OUT = "<output folder>"  # in a case's args: a folder of its own, which the failed command must not create


@dataclass
class Case:
    args: list[Any]
    needles: tuple[str, ...]


def truncate(src: Path, dst: Path) -> None:
    """Copy the header of a safetensors file and the first kilobyte of its data: a download cut short."""
    with src.open("rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(0)
        dst.write_bytes(f.read(8 + header + 1024))


def link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy(src, dst)


def folder_with(tmp: Path, name: str, config: Path, weights: Path, how: str) -> Path:
    """A copy of `config`'s folder whose weights file (`weights`' name) is truncated, garbage, or linked."""
    folder = tmp / name
    folder.mkdir()
    shutil.copy(config, folder / config.name)
    dst = folder / weights.name
    if how == "truncated":
        truncate(weights, dst)
    elif how == "garbage":
        dst.write_bytes(GARBAGE)
    else:
        link(weights, dst)
    return folder


def make_cases(tmp: Path, hf: Path, checkpoint: Path, engine: Path, tokenizer: Any) -> dict[str, Case]:
    run = ["run", "--engine_dir", engine, "--tokenizer_dir", hf]
    on_cpu = ["--device", "cpu"] if torch.cuda.is_available() else []  # where there is no GPU: the default

    gpt2 = tmp / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257, "n_embd": 768,
        "n_layer": 12, "n_head": 12, "n_positions": 1024,
    }))
    save_file({"transformer.wte.weight": torch.zeros(4, 4)}, str(gpt2 / "model.safetensors"))

    hf_truncated = folder_with(tmp, "hf-truncated", hf / "config.json", hf / "model.safetensors", "truncated")
    ckpt_truncated = folder_with(tmp, "ckpt-truncated", checkpoint / "config.json",
                                 checkpoint / "rank0.safetensors", "truncated")
    ckpt_garbage = folder_with(tmp, "ckpt-garbage", checkpoint / "config.json", checkpoint / "rank0.safetensors",
                               "garbage")
    eng_truncated = folder_with(tmp, "engine-truncated", engine / "engine.json", engine / "rank0.safetensors",
                                "truncated")
    eng_garbage = folder_with(tmp, "engine-garbage", engine / "engine.json", engine / "rank0.safetensors", "garbage")
    # a readable safetensors file, but a checkpoint's (q, k, v apart) where the engine wants its own layout
    eng_wrong = folder_with(tmp, "engine-wrong-layout", engine / "engine.json", checkpoint / "rank0.safetensors",
                            "linked")
    eng_cuda = folder_with(tmp, "engine-cuda", engine / "engine.json", engine / "rank0.safetensors", "linked")
    cfg = json.loads((eng_cuda / "engine.json").read_text())
    cfg["device"] = CUDA_DEVICE
    (eng_cuda / "engine.json").write_text(json.dumps(cfg))
    eng_bad_json = folder_with(tmp, "engine-bad-json", engine / "engine.json", engine / "rank0.safetensors", "linked")
    (eng_bad_json / "engine.json").write_text('{"format": "kiln-engine/1", "build": ')

    long_prompt = "hello " * (MAX_INPUT_LEN + 20)
    n_long = len(tokenizer.encode(long_prompt).ids)
    assert n_long > MAX_INPUT_LEN
    mid_prompt = "hello " * (MAX_INPUT_LEN - 28)
    n_mid = len(tokenizer.encode(mid_prompt).ids)
    max_out = MAX_SEQ_LEN - n_mid + 50
    assert n_mid <= MAX_INPUT_LEN < max_out and n_mid + max_out > MAX_SEQ_LEN

    outside_vocab = tmp / "outside-vocab.csv"
    outside_vocab.write_text("1,2,99999999\n")
    not_gguf = tmp / "model.gguf"
    not_gguf.write_text("not a GGUF file\n")

    return {
        # missing folders and files
        "convert_missing_model_dir": Case(
            ["convert", "--model_dir", tmp / "nope", "--output_dir", OUT], ("--model_dir", "no such folder")),
        "run_missing_engine_dir": Case(
            ["run", "--engine_dir", tmp / "nope", "--tokenizer_dir", hf, "--input_text", "Hi"],
            ("--engine_dir", str(tmp / "nope"), "no such folder")),
        "run_engine_dir_is_a_checkpoint": Case(
            ["run", "--engine_dir", checkpoint, "--tokenizer_dir", hf, "--input_text", "Hi"],
            ("--engine_dir", "engine.json", "does not exist")),
        "build_checkpoint_dir_is_an_hf_folder": Case(
            ["build", "--checkpoint_dir", hf, "--output_dir", OUT], ("not a kiln checkpoint", "kiln convert")),
        "run_without_tokenizer_dir_flag": Case(["run", "--engine_dir", engine, "--input_text", "Hi"],
                                               ("--tokenizer_dir",)),
        "run_missing_tokenizer_dir": Case(
            ["run", "--engine_dir", engine, "--tokenizer_dir", tmp / "nope", "--input_text", "Hi"],
            ("--tokenizer_dir", "no such folder")),
        "convert_gguf_is_not_gguf": Case(
            ["convert", "--gguf", not_gguf, "--output_dir", OUT], ("--gguf", "not a GGUF file")),
        # models kiln does not run
        "unknown_architecture": Case(
            ["convert", "--model_dir", gpt2, "--output_dir", OUT],
            ("GPT2LMHeadModel", "not supported", "LlamaForCausalLM")),
        # requests over the engine's limits name both numbers
        "prompt_over_max_input_len": Case(
            [*run, "--input_text", long_prompt, "--max_output_len", "4"],
            (f"the prompt has {n_long} tokens", f"max_input_len {MAX_INPUT_LEN}")),
        "prompt_and_output_over_max_seq_len": Case(
            [*run, "--input_text", mid_prompt, "--max_output_len", max_out],
            (f"prompt ({n_mid} tokens) + max output ({max_out})", f"max_seq_len {MAX_SEQ_LEN}")),
        "empty_prompt": Case([*run, "--input_text", ""], ("prompt is empty",)),
        "no_prompt": Case(run, ("no prompt", "--input_text", "--input_file")),
        "csv_input_outside_vocabulary": Case([*run, "--input_file", outside_vocab],
                                             ("99999999", "outside the vocabulary")),
        # bad flag values
        "build_max_batch_size_0": Case(
            ["build", "--checkpoint_dir", checkpoint, "--output_dir", OUT, "--max_batch_size", "0"],
            ("--max_batch_size", "0 is invalid")),
        "build_tokens_per_block_abc": Case(
            ["build", "--checkpoint_dir", checkpoint, "--output_dir", OUT, "--tokens_per_block", "abc"],
            ("--tokens_per_block", "'abc'")),
        "build_max_input_len_over_max_seq_len": Case(
            ["build", "--checkpoint_dir", checkpoint, "--output_dir", OUT, "--max_input_len", "512",
             "--max_seq_len", "256"], ("--max_input_len 512", "--max_seq_len 256")),
        "build_switch_value": Case(
            ["build", "--checkpoint_dir", checkpoint, "--output_dir", OUT, "--use_fused_mlp", "maybe"],
            ("--use_fused_mlp", "'maybe'", "enable or disable")),
        "run_temperature_negative": Case([*run, "--input_text", "Hi", "--temperature", "-1"],
                                         ("--temperature", "-1")),
        "run_top_p_over_1": Case([*run, "--input_text", "Hi", "--top_p", "1.5"], ("top_p", "1.5")),
        "run_max_output_len_0": Case([*run, "--input_text", "Hi", "--max_output_len", "0"],
                                     ("--max_output_len", "0 is invalid")),
        "run_random_seed_over_64_bits": Case([*run, "--input_text", "Hi", "--random_seed", str(2**70)],
                                             ("--random_seed", str(2**70))),
        "convert_dtype_float8": Case(
            ["convert", "--model_dir", hf, "--output_dir", OUT, "--dtype", "float8"], ("--dtype", "'float8'")),
        "convert_tp_size_not_dividing_heads": Case(
            ["convert", "--model_dir", hf, "--output_dir", OUT, "--tp_size", "2"],
            ("--tp_size 2", "9 attention heads")),
        # damaged weights
        "hf_model_safetensors_truncated": Case(
            ["convert", "--model_dir", hf_truncated, "--output_dir", OUT],
            (str(hf_truncated / "model.safetensors"), "not a readable safetensors file")),
        "checkpoint_rank0_truncated": Case(
            ["build", "--checkpoint_dir", ckpt_truncated, "--output_dir", OUT],
            (str(ckpt_truncated / "rank0.safetensors"), "not a readable safetensors file")),
        "checkpoint_rank0_garbage": Case(
            ["build", "--checkpoint_dir", ckpt_garbage, "--output_dir", OUT],
            (str(ckpt_garbage / "rank0.safetensors"), "not a readable safetensors file")),
        "engine_rank0_truncated": Case(
            ["run", "--engine_dir", eng_truncated, "--tokenizer_dir", hf, "--input_text", "Hi"],
            (str(eng_truncated / "rank0.safetensors"), "not a readable safetensors file")),
        "engine_rank0_garbage": Case(
            ["run", "--engine_dir", eng_garbage, "--tokenizer_dir", hf, "--input_text", "Hi"],
            (str(eng_garbage / "rank0.safetensors"), "not a readable safetensors file")),
        "engine_rank0_of_a_checkpoint": Case(
            ["run", "--engine_dir", eng_wrong, "--tokenizer_dir", hf, "--input_text", "Hi"],
            (str(eng_wrong / "rank0.safetensors"), "does not match engine.json", "rebuild")),
        # an engine built elsewhere
        "engine_built_for_cuda": Case(
            ["run", "--engine_dir", eng_cuda, "--tokenizer_dir", hf, "--input_text", "Hi", *on_cpu],
            ("built for NVIDIA H100 80GB HBM3 (compute capability 9.0)", "the CPU", "rebuild", "kiln build")),
        "engine_json_damaged": Case(
            ["run", "--engine_dir", eng_bad_json, "--tokenizer_dir", hf, "--input_text", "Hi"],
            (str(eng_bad_json / "engine.json"), "not valid JSON")),
    }


CASES = [
    # missing or wrong folders and files
    "convert_missing_model_dir", "run_missing_engine_dir", "run_engine_dir_is_a_checkpoint",
    "build_checkpoint_dir_is_an_hf_folder", "run_without_tokenizer_dir_flag", "run_missing_tokenizer_dir",
    "convert_gguf_is_not_gguf",
    # models kiln does not run
    "unknown_architecture",
    # requests over the engine's limits, and empty ones
    "prompt_over_max_input_len", "prompt_and_output_over_max_seq_len", "empty_prompt", "no_prompt",
    "csv_input_outside_vocabulary",
    # bad flag values
    "build_max_batch_size_0", "build_tokens_per_block_abc", "build_max_input_len_over_max_seq_len",
    "build_switch_value", "run_temperature_negative", "run_top_p_over_1", "run_max_output_len_0",
    "run_random_seed_over_64_bits", "convert_dtype_float8", "convert_tp_size_not_dividing_heads",
    # damaged weights
    "hf_model_safetensors_truncated", "checkpoint_rank0_truncated", "checkpoint_rank0_garbage",
    "engine_rank0_truncated", "engine_rank0_garbage", "engine_rank0_of_a_checkpoint", "engine_json_damaged",
    # an engine built for another device
    "engine_built_for_cuda",
]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("errors")


@pytest.fixture(scope="module")
def cases(smollm2_hf: Path, checkpoint: Path, engine: Path, tokenizer: Any, tmp: Path) -> dict[str, Case]:
    cases = make_cases(tmp, smollm2_hf, checkpoint, engine, tokenizer)
    assert sorted(cases) == sorted(CASES)
    for name, case in cases.items():
        case.args = [tmp / f"out-{name}" if arg == OUT else arg for arg in case.args]
    return cases


@pytest.fixture(scope="module")
def results(cases: dict[str, Case], background: Background) -> dict[str, Future[subprocess.CompletedProcess[str]]]:
    # `kiln run` first: most of those load the engine, so that the quick ones fill the gaps at the end
    order = sorted(cases, key=lambda name: cases[name].args[0] != "run")
    return {name: background.kiln(*cases[name].args) for name in order}


@pytest.mark.parametrize("name", CASES)
def test_user_error(
    name: str, cases: dict[str, Case], results: dict[str, Future[subprocess.CompletedProcess[str]]], tmp: Path
) -> None:
    check_user_error(results[name].result(), *cases[name].needles)
    output = tmp / f"out-{name}"
    assert not output.exists(), f"the failed command left {output} behind"

