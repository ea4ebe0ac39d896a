"""AutoAWQ GEMM folders (kiln.checkpoint.autoawq): the int32 packing against a per-element reading of
AutoAWQ's published order, kiln int4_awq -> AutoAWQ -> kiln bit for bit, the same logits from both
engines, AutoAWQ's own dequantization formula, and one-line refusals of what kiln does not read.
A tiny random Llama; the whole file runs in well under a minute on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.builder.build import build_engine
from kiln.checkpoint import autoawq
from kiln.checkpoint.convert import convert_hf
from kiln.config import BuildConfig, SamplingParams
from kiln.errors import KilnError
from kiln.quant.formats import dequantize_int
from kiln.quant.methods import QuantConfig
from kiln.runtime.engine import LLM
from kiln.runtime.sequence import Sequence

GROUP = 64
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's order_map, WQLinear_GEMM.from_linear (see the module docstring)
PROJS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")
LIMITS = BuildConfig(max_batch_size=1, max_input_len=32, max_seq_len=32, max_num_tokens=32)


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    """Tiny tensors: one intra-op thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 128, GQA, vocab 256) as a Hugging Face folder, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, initializer_range=0.1)
    folder = tmp_path_factory.mktemp("hf")
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def kiln_ckpt(hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model quantized by kiln (int4_awq layout, round-to-nearest), float16."""
    return convert_hf(hf, tmp_path_factory.mktemp("c") / "ckpt", "float16", quant=QuantConfig("int4_awq", GROUP))


@pytest.fixture(scope="module")
def awq_dir(kiln_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return autoawq.export_checkpoint(kiln_ckpt, tmp_path_factory.mktemp("a") / "awq")


@pytest.fixture(scope="module")
def imported(awq_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_hf(awq_dir, tmp_path_factory.mktemp("i") / "ckpt", "float16")


# ---- (a) packing -----------------------------------------------------------------------------------

def reference_words(q: list[list[int]]) -> torch.Tensor:
    """Per element, as from_linear does: word j of a row ORs column 8j + ORDER[i] in at bit 4i."""
    rows = []
    for row in q:
        words = []
        for j in range(len(row) // 8):
            word = 0
            for i in range(8):
                word |= row[8 * j + ORDER[i]] << (4 * i)
            words.append(word - 2**32 if word >= 2**31 else word)  # the int32 with these 32 bits
        rows.append(words)
    return torch.tensor(rows, dtype=torch.int32)


def reference_value(words: torch.Tensor, k: int, n: int) -> int:
    """Column n of row k, read from its word: nibble i holds column ORDER[i]."""
    return (int(words[k, n // 8]) >> (4 * ORDER.index(n % 8))) & 0xF


def test_pack_is_autoawqs_published_order_bit_for_bit():
    assert autoawq.pack_awq(torch.arange(8)[None]).tolist() == [[0x75316420]]  # nibbles hold 0,2,4,6,1,3,5,7
    assert autoawq.pack_awq(torch.arange(8, 16)[None]).tolist() == [[0xFDB9ECA8 - 2**32]]  # negative int32
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (5, 32), generator=g)
    want = reference_words(q.tolist())
    got = autoawq.pack_awq(q)
    assert got.dtype == torch.int32 and torch.equal(got, want)
    back = autoawq.unpack_awq(want)
    assert back.dtype == torch.uint8 and torch.equal(back, q.to(torch.uint8))
    assert all(reference_value(want, k, n) == q[k, n] for k in range(5) for n in range(32))


def test_export_linear_transposes_and_packs():
    g = torch.Generator().manual_seed(1)
    n, k, group = 16, 64, 32
    q = torch.randint(0, 16, (n, k), generator=g)
    zeros = torch.randint(0, 16, (n, k // group), generator=g).to(torch.uint8)
    scales = torch.rand(n, k // group, generator=g).half()
    from kiln.quant.formats import pack_int4

    out = autoawq.export_autoawq({"qweight": pack_int4(q), "zeros": zeros, "scales": scales})
    assert torch.equal(out["qweight"], reference_words(q.T.tolist()))  # [K, N / 8]
    assert torch.equal(out["qzeros"], reference_words(zeros.T.tolist()))  # [K / g, N / 8]
    assert out["scales"].dtype == torch.float16 and torch.equal(out["scales"], scales.T)
    back = autoawq.import_autoawq_linear(out, group, "layer")
    assert torch.equal(back["qweight"], pack_int4(q)) and torch.equal(back["zeros"], zeros)
    assert torch.equal(back["scales"], scales)


# ---- (b) round trip --------------------------------------------------------------------------------

def test_exported_folder_is_autoawq(awq_dir: Path):
    config = json.loads((awq_dir / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "zero_point": True, "group_size": GROUP,
                                             "bits": 4, "version": "gemm", "modules_to_not_convert": None}
    t = load_file(str(awq_dir / "model.safetensors"))
    assert t["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int32
    assert t["model.layers.0.self_attn.q_proj.qweight"].shape == (128, 16)  # [K, N / 8]
    assert t["model.layers.0.self_attn.k_proj.qzeros"].shape == (2, 8)  # [K / g, N / 8], N = 2 kv heads * 32
    assert t["model.layers.1.mlp.down_proj.scales"].shape == (4, 128)  # [K / g, N]
    assert t["model.layers.1.mlp.down_proj.scales"].dtype == torch.float16
    assert all(t[n].dtype == torch.float16 for n in ("model.embed_tokens.weight", "lm_head.weight",
                                                      "model.norm.weight", "model.layers.0.input_layernorm.weight"))
    assert not any(n.endswith((".zeros", "proj.weight")) for n in t)


def test_round_trip_is_bit_identical(kiln_ckpt: Path, imported: Path):
    want, got = (load_file(str(c / "rank0.safetensors")) for c in (kiln_ckpt, imported))
    assert want.keys() == got.keys()
    for name in want:
        assert want[name].dtype == got[name].dtype and torch.equal(want[name], got[name]), name
    a, b = (json.loads((c / "config.json").read_text()) for c in (kiln_ckpt, imported))
    assert a["quantization"] == b["quantization"] == {"quant_algo": "int4_awq", "group_size": GROUP, "bits": 4}
    assert a["model"] == b["model"] and b["dtype"] == "float16"


def test_float_folder_to_autoawq_equals_kilns_quantizer(hf: Path, tmp_path: Path):
    """quantize_to_autoawq (RTN) then import == kiln's own int4_awq convert, tp 1 and tp 2 alike."""
    awq = autoawq.quantize_to_autoawq(hf, tmp_path / "awq", GROUP)
    for tp in (1, 2):
        direct = convert_hf(hf, tmp_path / f"direct{tp}", "float16", tp, quant=QuantConfig("int4_awq", GROUP))
        via = convert_hf(awq, tmp_path / f"via{tp}", "float16", tp)
        for rank in range(tp):
            want, got = (load_file(str(c / f"rank{rank}.safetensors")) for c in (direct, via))
            assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)


def test_per_channel_is_group_size_minus_one(hf: Path, tmp_path: Path):
    ckpt = convert_hf(hf, tmp_path / "ckpt", "float16", quant=QuantConfig("int4_awq", 0))
    awq = autoawq.export_checkpoint(ckpt, tmp_path / "awq")
    assert json.loads((awq / "config.json").read_text())["quantization_config"]["group_size"] == -1
    back = convert_hf(awq, tmp_path / "back", "float16")
    want, got = (load_file(str(c / "rank0.safetensors")) for c in (ckpt, back))
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_older_spellings_are_read(awq_dir: Path, kiln_ckpt: Path, tmp_path: Path):
    """version "GEMM", and a quant_config.json (w_bit, q_group_size) instead of config.json's entry."""
    upper = convert_hf(variant(awq_dir, tmp_path / "upper", {"version": "GEMM"}), tmp_path / "c1", "float16")
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((awq_dir / "config.json").read_text())
    del config["quantization_config"]
    (old / "config.json").write_text(json.dumps(config))
    (old / "quant_config.json").write_text(json.dumps({"zero_point": True, "q_group_size": GROUP, "w_bit": 4,
                                                       "version": "GEMM"}))
    (old / "model.safetensors").symlink_to(awq_dir / "model.safetensors")
    want = load_file(str(kiln_ckpt / "rank0.safetensors"))
    for ckpt in (upper, convert_hf(old, tmp_path / "c2", "float16")):
        got = load_file(str(ckpt / "rank0.safetensors"))
        assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)


# ---- (c) engines -----------------------------------------------------------------------------------

def prompt_logits(ckpt: Path, engine: Path, ids: list[int]) -> torch.Tensor:
    build_engine(ckpt, engine, LIMITS, "cpu")
    llm = LLM(engine, device="cpu")
    seq = Sequence(list(ids), SamplingParams(max_tokens=1))
    llm.blocks.grow(seq, len(ids))
    return llm.runner.run_all_logits([(seq, len(ids))])  # [tokens, vocab]


def test_imported_checkpoint_builds_and_gives_the_same_logits(kiln_ckpt: Path, imported: Path, tmp_path: Path):
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    want = prompt_logits(kiln_ckpt, tmp_path / "e1", ids)
    got = prompt_logits(imported, tmp_path / "e2", ids)
    assert want.shape == (24, 256) and torch.isfinite(want).all()
    assert torch.equal(want, got)


# ---- (d) AutoAWQ's formula -------------------------------------------------------------------------

def test_autoawq_formula_equals_kilns_dequantization(awq_dir: Path, imported: Path):
    awq, ours = load_file(str(awq_dir / "model.safetensors")), load_file(str(imported / "rank0.safetensors"))
    for layer in range(2):
        for proj in PROJS:
            p = f"model.layers.{layer}.{proj}"
            qweight, qzeros, scales = (awq[f"{p}.{k}"] for k in ("qweight", "qzeros", "scales"))
            k_in, n_out = qweight.shape[0], qweight.shape[1] * 8
            # w[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n], unpacked with the plain shift-and-mask reading
            q = autoawq.unpack_awq(qweight).float()  # checked against reference_value below
            z = autoawq.unpack_awq(qzeros).float().repeat_interleave(GROUP, dim=0)
            w = (q - z) * scales.float().repeat_interleave(GROUP, dim=0)  # [K, N]
            for k, n in [(0, 0), (1, 7), (k_in - 1, n_out - 1), (GROUP + 3, 13)]:
                assert q[k, n] == reference_value(qweight, k, n)
                assert z[k, n] == reference_value(qzeros, k // GROUP, n)
            kiln_w = dequantize_int({k: ours[f"{p}.{k}"] for k in ("qweight", "zeros", "scales")}, torch.float32)
            assert torch.equal(w.T, kiln_w), p  # kiln holds W [N, K], AutoAWQ w = W^T


def test_imported_weights_stay_close_to_the_float_model(hf: Path, imported: Path):
    """Guards against a consistent but wrong reading (e.g. a column permutation both ways): int4 of a
    random weight is within a few % of it, a permuted one is not."""
    base, ours = load_file(str(hf / "model.safetensors")), load_file(str(imported / "rank0.safetensors"))
    for p in (f"model.layers.1.{proj}" for proj in PROJS):
        w = base[f"{p}.weight"]
        err = dequantize_int({k: ours[f"{p}.{k}"] for k in ("qweight", "zeros", "scales")}, torch.float32) - w
        assert err.norm() < 0.2 * w.norm(), p


# ---- (e) refusals ----------------------------------------------------------------------------------

BAD = {
    "bits-8": ({"bits": 8}, "bits 8"),
    "gemv": ({"version": "gemv"}, "version 'gemv'"),
    "exllama": ({"version": "exllama"}, "version 'exllama'"),
    "marlin": ({"version": "marlin"}, "version 'marlin'"),
    "no-zero-point": ({"zero_point": False}, "zero_point False"),
    "gptq": ({"quant_method": "gptq"}, "quant_method 'gptq'"),
}


def variant(awq_dir: Path, folder: Path, change: dict) -> Path:
    """awq_dir with its quantization_config changed (weights linked, not copied)."""
    folder.mkdir()
    config = json.loads((awq_dir / "config.json").read_text())
    config["quantization_config"].update(change)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").symlink_to(awq_dir / "model.safetensors")
    return folder


@pytest.mark.parametrize("case", BAD)
def test_unsupported_quantization_configs_are_refused(awq_dir: Path, tmp_path: Path, case: str):
    change, words = BAD[case]
    with pytest.raises(KilnError, match=words) as e:
        convert_hf(variant(awq_dir, tmp_path / "bad", change), tmp_path / "out")
    assert "kiln reads AutoAWQ checkpoints with quant_method 'awq', version 'gemm'" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_broken_folders_are_refused(awq_dir: Path, tmp_path: Path):
    t = load_file(str(awq_dir / "model.safetensors"))
    cases = {
        "qzeros missing": ({n: v for n, v in t.items() if n != "model.layers.1.mlp.up_proj.qzeros"},
                           "model.layers.1.mlp.up_proj: qzeros missing"),
        "float linear": ({**t, "model.layers.0.mlp.up_proj.weight": torch.zeros(256, 128, dtype=torch.float16)},
                         "model.layers.0.mlp.up_proj.weight is not quantized"),
    }
    for i, (tensors, words) in enumerate(cases.values()):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        (folder / "config.json").write_text((awq_dir / "config.json").read_text())
        save_file(tensors, str(folder / "model.safetensors"))
        with pytest.raises(KilnError, match=words):
            convert_hf(folder, tmp_path / f"out{i}")
    with pytest.raises(KilnError, match=r"qzeros has shape \(\d+, \d+\), expected \(\d+, \d+\) for in_features \d+, group_size 32"):
        convert_hf(variant(awq_dir, tmp_path / "g32", {"group_size": 32}), tmp_path / "out")


def kiln(*args: str | Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "kiln", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_cli_converts_and_builds_and_refuses_in_one_line(awq_dir: Path, kiln_ckpt: Path, tmp_path: Path):
    ckpt, engine = tmp_path / "ckpt", tmp_path / "engine"
    refusals = {
        "gptq": (["--model_dir", variant(awq_dir, tmp_path / "gptq", {"quant_method": "gptq"})],
                 "quant_method 'gptq' is not supported"),
        "bits": (["--model_dir", variant(awq_dir, tmp_path / "b8", {"bits": 8})], "bits 8 is not supported"),
        "requant": (["--model_dir", awq_dir, "--use_weight_only", "--weight_only_precision", "int4"],
                    "is already quantized (AutoAWQ int4, group_size 64)"),
    }
    running = {name: kiln("convert", *args, "--output_dir", tmp_path / f"out-{name}")
               for name, (args, _) in refusals.items()}
    convert = kiln("convert", "--model_dir", awq_dir, "--output_dir", ckpt)
    for name, proc in running.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, (name, err)
        assert err.startswith("kiln convert: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert refusals[name][1] in err, err
    out, err = convert.communicate(timeout=120)
    assert convert.returncode == 0, err
    assert "int4_awq group 64" in out, out
    assert json.loads((ckpt / "config.json").read_text())["quantization"]["quant_algo"] == "int4_awq"
    want, got = (load_file(str(c / "rank0.safetensors")) for c in (kiln_ckpt, ckpt))
    assert all(torch.equal(want[n], got[n]) for n in want)
    build = kiln("build", "--checkpoint_dir", ckpt, "--output_dir", engine, "--max_input_len", "16",
                 "--max_seq_len", "32")
    out, err = build.communicate(timeout=120)
    assert build.returncode == 0, err
    assert (engine / "rank0.safetensors").is_file()
