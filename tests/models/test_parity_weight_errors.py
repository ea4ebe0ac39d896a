"""Bad weights anywhere in the pipeline (HF folder -> checkpoint -> engine) raise KilnError.

Missing tensors, wrong shapes and corrupt safetensors files must surface as a KilnError naming the
problem, not as a KeyError / RuntimeError / AttributeError traceback from torch or safetensors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.builder.build import build_engine
from kiln.checkpoint.convert import convert_hf
from kiln.config import BuildConfig
from kiln.errors import KilnError
from kiln.runtime.engine import LLM

BUILD = BuildConfig(max_batch_size=2, max_input_len=16, max_seq_len=32, tokens_per_block=16)
NAME = "qwen2"  # has biases, GQA and tied embeddings: the most kinds of tensors


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _drop(name):
    return lambda t: t.pop(name)


def _reshape(name, shape):
    def edit(t):
        assert name in t
        t[name] = torch.zeros(shape, dtype=t[name].dtype)

    return edit


def _add(name, shape):
    def edit(t):
        t[name] = torch.zeros(shape)

    return edit


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\x01not a safetensors file at all" * 10)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _bad_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:20] = b"{]]]]]]]]]]]"  # the JSON header is broken; its length prefix is intact
    path.write_bytes(bytes(data))


def _huge_header_len(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0:8] = (2**40).to_bytes(8, "little")
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated": _truncate, "garbage": _garbage, "empty": _empty,
    "bad_header": _bad_header, "huge_header_len": _huge_header_len,
}

# Edits of a tensor file, each applied to the HF folder, to the checkpoint and to the engine.
Q = "model.layers.1.self_attn.q_proj.{}"
TENSOR_EDITS = {
    "missing_weight": lambda fused: _drop("model.layers.1.self_attn.qkv_proj.weight" if fused else Q.format("weight")),
    "missing_bias": lambda fused: _drop("model.layers.0.self_attn.qkv_proj.bias" if fused else "model.layers.0.self_attn.k_proj.bias"),
    "missing_norm": lambda fused: _drop("model.layers.0.post_attention_layernorm.weight"),
    "missing_embedding": lambda fused: _drop("model.embed_tokens.weight"),
    "wrong_shape_weight": lambda fused: _reshape(
        "model.layers.1.self_attn.qkv_proj.weight" if fused else Q.format("weight"), (64, 63)
    ),
    "wrong_shape_rows": lambda fused: _reshape("model.layers.0.mlp.down_proj.weight", (63, 128)),
    "wrong_shape_bias": lambda fused: _reshape(
        "model.layers.1.self_attn.qkv_proj.bias" if fused else Q.format("bias"), (65,)
    ),
    "wrong_shape_norm": lambda fused: _reshape("model.norm.weight", (32,)),
    "wrong_shape_embedding": lambda fused: _reshape("model.embed_tokens.weight", (160, 32)),
    "wrong_rank": lambda fused: _reshape("model.norm.weight", (64, 1)),
    "unexpected_tensor": lambda fused: _add("model.layers.0.self_attn.rotary.extra", (4,)),
    # a bias the architecture does not have (Qwen2 has none on o_proj or the MLP)
    "unexpected_bias": lambda fused: _add("model.layers.0.mlp.down_proj.bias", (64,)),
}


@pytest.fixture
def pipeline(hf_model, tmp_path):
    """A fresh copy of the HF folder, and its checkpoint and engine, to damage."""
    m = hf_model(NAME)
    hf = tmp_path / "hf"
    shutil.copytree(m.hf_dir, hf)
    ckpt = convert_hf(hf, tmp_path / "ckpt", dtype="float32")
    engine = tmp_path / "engine"
    build_engine(ckpt, engine, BUILD, device="cpu")
    LLM(engine, device="cpu")  # undamaged, it loads
    return hf, ckpt, engine, tmp_path


def _convert_and_build(hf: Path, tmp: Path, tp_size: int = 1) -> None:
    ckpt = convert_hf(hf, tmp / "ckpt2", dtype="float32", tp_size=tp_size)
    build_engine(ckpt, tmp / "engine2", BUILD, device="cpu")


@pytest.mark.parametrize("edit", list(TENSOR_EDITS))
def test_bad_tensor_in_hf_folder(pipeline, edit):
    hf, _, _, tmp = pipeline
    _rewrite(hf / "model.safetensors", TENSOR_EDITS[edit](False))
    if edit.startswith("wrong_"):  # with one rank convert copies tensors as they are; build checks shapes
        with pytest.raises(KilnError):
            _convert_and_build(hf, tmp)
    else:  # a missing or unexpected tensor is refused by convert itself, before a checkpoint is written
        with pytest.raises(KilnError) as err:
            convert_hf(hf, tmp / "ckpt2", dtype="float32")
        assert not (tmp / "ckpt2").exists()
        assert CONVERT_NAMES[edit] in str(err.value)


# What convert's error names for each missing / unexpected tensor of the HF folder.
CONVERT_NAMES = {
    "missing_weight": "model.layers.1.self_attn.qkv_proj.weight[q]",
    "missing_bias": "model.layers.0.self_attn.qkv_proj.bias[k]",
    "missing_norm": "model.layers.0.post_attention_layernorm.weight",
    "missing_embedding": "model.embed_tokens.weight",
    "unexpected_tensor": "model.layers.0.self_attn.rotary.extra",
    "unexpected_bias": "model.layers.0.mlp.down_proj.bias",
}


@pytest.mark.parametrize("edit", ["wrong_shape_weight", "wrong_shape_rows", "wrong_shape_embedding", "wrong_shape_bias"])
def test_bad_tensor_in_hf_folder_tp2(pipeline, edit):
    """Sharding for two ranks must not turn a wrong shape into a ValueError traceback."""
    hf, _, _, tmp = pipeline
    _rewrite(hf / "model.safetensors", TENSOR_EDITS[edit](False))
    with pytest.raises(KilnError):
        _convert_and_build(hf, tmp, tp_size=2)


@pytest.mark.parametrize("edit", list(TENSOR_EDITS))
def test_bad_tensor_in_checkpoint(pipeline, edit):
    _, ckpt, _, tmp = pipeline
    _rewrite(ckpt / "rank0.safetensors", TENSOR_EDITS[edit](False))
    with pytest.raises(KilnError):
        build_engine(ckpt, tmp / "engine2", BUILD, device="cpu")
    assert not (tmp / "engine2").exists(), "a failed build must not leave an engine folder"


@pytest.mark.parametrize("edit", list(TENSOR_EDITS))
def test_bad_tensor_in_engine(pipeline, edit):
    _, _, engine, _ = pipeline
    _rewrite(engine / "rank0.safetensors", TENSOR_EDITS[edit](True))
    with pytest.raises(KilnError):
        LLM(engine, device="cpu")


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("stage", ["hf", "checkpoint", "engine"])
def test_corrupt_safetensors(pipeline, stage, corruption):
    hf, ckpt, engine, tmp = pipeline
    path = {"hf": hf / "model.safetensors", "checkpoint": ckpt / "rank0.safetensors", "engine": engine / "rank0.safetensors"}[stage]
    CORRUPTIONS[corruption](path)
    with pytest.raises(KilnError) as err:
        if stage == "hf":
            _convert_and_build(hf, tmp)
        elif stage == "checkpoint":
            build_engine(ckpt, tmp / "engine2", BUILD, device="cpu")
        else:
            LLM(engine, device="cpu")
    assert path.name in str(err.value)
