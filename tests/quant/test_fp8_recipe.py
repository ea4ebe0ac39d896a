"""fp8's calibrated recipe (kiln.quant.smooth, kiln.quant.gptq, kiln.quant.fp8): smoothing is an exact
reparametrization of the float model (GQA o_proj included), it lowers the fp8 error of a layer whose
inputs have massive outlier channels, GPTQ's e4m3 weights beat round-to-nearest on correlated inputs and
survive the checkpoint writer's re-quantization bit for bit, the folded checkpoint builds and runs on the
reference path (also at --tp_size 2), and bad flag values are refused. Tiny random models only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from kiln.builder.build import build_engine
from kiln.checkpoint.convert import convert_hf, read_hf_config
from kiln.config import BuildConfig
from kiln.errors import KilnError
from kiln.layers.attention import AttentionMetadata
from kiln.quant import gptq, layerwise, smooth
from kiln.quant.defaults import FP8_GPTQ, FP8_SMOOTHQUANT
from kiln.quant.formats import fake_quantize_fp8_per_token, quantize_fp8
from kiln.quant.fp8 import fp8_transform
from kiln.quant.quantize import QuantizeRequest, quantize
from kiln.runtime.engine import LLM

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 160


def tiny_model(folder: Path, kv_heads: int, seed: int = 0) -> torch.nn.Module:
    """A random Llama (4 heads, `kv_heads` kv heads) with 4 outlier channels in every decoder norm."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                                   tie_word_embeddings=False, attention_bias=kv_heads == 2)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
                if ".layers." in name:
                    p[torch.randperm(p.numel(), generator=g)[:4]] *= 20.0
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(folder))
    return model.eval()


def windows(n: int, length: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=g) for _ in range(n)]


@torch.no_grad()
def hf_logits(model: torch.nn.Module, state: dict[str, torch.Tensor], seqs: list[torch.Tensor]) -> torch.Tensor:
    other = type(model)(model.config).eval()
    other.load_state_dict(state, strict=True)
    return torch.cat([other(input_ids=s[None]).logits[0] for s in seqs])


# ---- smoothing -------------------------------------------------------------------------------------

def outlier_layer(seed: int, outlier: float) -> tuple[torch.Tensor, torch.Tensor]:
    """w [96, 256]; x [512, 256] whose 4 outlier channels are `outlier` times larger than the rest."""
    g = torch.Generator().manual_seed(seed)
    w = 0.05 * torch.randn(96, 256, generator=g)
    x = torch.randn(512, 256, generator=g)
    x[:, torch.randperm(256, generator=g)[:4]] *= outlier
    return w, x


def test_folded_smoothing_keeps_a_layer_output():
    w, x = outlier_layer(seed=0, outlier=100.0)
    norm = 1.0 + 0.1 * torch.rand(256)
    site = layerwise.Site("qkv", "norm", ("a", "b"))
    layer = {"norm.weight": norm, "a.weight": w[:64], "b.weight": w[64:]}
    s = smooth.smoothing_factors((x * norm).abs().amax(0), [w[:64], w[64:]], 0.5)
    assert s.max() / s.min() > 10, "outlier channels should get much larger factors"
    layerwise.fold(layer, site, s)
    got = torch.cat([(x * layer["norm.weight"]) @ layer[n].T for n in ("a.weight", "b.weight")], dim=1)
    torch.testing.assert_close(got, (x * norm) @ w.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_smoothing_the_model_keeps_its_logits(tmp_path, kv_heads):
    model = tiny_model(tmp_path, kv_heads)
    out = dict(fp8_transform(tmp_path, read_hf_config(tmp_path), windows(4, 32, seed=1), 0.5, gptq=False,
                             progress=False))
    orig = {n: p.detach().clone() for n, p in model.state_dict().items()}
    assert out.keys() == orig.keys()
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.up_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.o_proj.weight"):  # every site folded, GQA's o too
        assert (out[f"model.layers.1.{name}"] - orig[f"model.layers.1.{name}"]).abs().max() > 1e-3, name
    seqs = windows(2, 40, seed=2)
    torch.testing.assert_close(hf_logits(model, out, seqs), hf_logits(model, orig, seqs), atol=1e-4, rtol=1e-4)


def test_gqa_factors_repeat_per_kv_head():
    g = torch.Generator().manual_seed(0)
    x_max, o = torch.rand(4 * 8, generator=g), torch.randn(16, 4 * 8, generator=g)
    s_kv = smooth.gqa_smoothing_factors(x_max, o, 0.5, num_kv_heads=2, heads_per_kv=2)  # [2 * 8]
    s = smooth.expand_gqa(s_kv, 2, 2).view(4, 8)
    assert torch.equal(s[0], s_kv[:8]) and torch.equal(s[1], s_kv[:8]) and torch.equal(s[3], s_kv[8:])


def fp8_layer_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None = None) -> float:
    """Relative output error of W8A8 e4m3 (per-channel weights, per-token activations), smoothed by s."""
    ref = x @ w.T
    if s is not None:
        x, w = x / s, w * s
    q = quantize_fp8(w)
    got = fake_quantize_fp8_per_token(x) @ (q["weight"].float() * q["weight_scale"][:, None]).T
    return ((got - ref).pow(2).mean() / ref.pow(2).mean()).item()


def test_smoothing_lowers_fp8_error_under_massive_outliers():
    # 4 channels 10,000x the rest (as the massive activations of LLMs): one per-token scale puts the
    # other channels in e4m3's subnormals, where most of their bits are lost.
    w, x = outlier_layer(seed=1, outlier=1e4)
    calib, test = x[:256], x[256:]
    s = smooth.smoothing_factors(calib.abs().amax(0), [w], 0.5)
    plain, smoothed = fp8_layer_error(test, w), fp8_layer_error(test, w, s)
    assert smoothed < 0.5 * plain, f"relative output error: smoothed {smoothed:.3g}, plain {plain:.3g}"


# ---- GPTQ ------------------------------------------------------------------------------------------

def correlated_inputs(n: int, dim: int, seed: int) -> torch.Tensor:
    """Inputs of low effective rank with a few large channels, as a layer's calibration inputs are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim // 4, dim, generator=g)
    x = torch.randn(n, dim // 4, generator=g) @ mix + 0.1 * torch.randn(n, dim, generator=g)
    x[:, :4] *= 8
    return x


def test_gptq_beats_round_to_nearest_and_survives_requantization():
    g = torch.Generator().manual_seed(3)
    w = 0.05 * torch.randn(64, 128, generator=g)
    x = correlated_inputs(2048, 128, seed=4)
    calib, test = x[:1024], x[1024:]
    q = gptq.gptq_fp8(w, calib.double().T @ calib.double())
    deq = q["weight"].float() * q["weight_scale"][:, None]
    rtn = quantize_fp8(w)
    rtn_deq = rtn["weight"].float() * rtn["weight_scale"][:, None]
    err = {name: (test @ v.T - test @ w.T).pow(2).mean().item() for name, v in (("gptq", deq), ("rtn", rtn_deq))}
    assert err["gptq"] < 0.7 * err["rtn"], err
    again = quantize_fp8(deq)  # what write_checkpoint does to the yielded float weights
    assert torch.equal(again["weight"].view(torch.uint8), q["weight"].view(torch.uint8))
    torch.testing.assert_close(again["weight_scale"], q["weight_scale"], rtol=1e-6, atol=0)


# ---- the recipe through kiln -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hf(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with SmolLM2's vocabulary (tied embeddings, GQA) and tokenizer, and 4
    outlier channels per decoder norm, so `kiln quantize` can calibrate it on the KJV text."""
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and ".layers." in name:
                p[torch.randperm(p.numel(), generator=g)[:4]] *= 20.0
    folder = tmp_path_factory.mktemp("tiny-fp8")
    model.save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2_hf / name).is_file():
            shutil.copy(smollm2_hf / name, folder / name)
    words = "in the beginning was the word and the word was with god and the light shineth in darkness".split()
    g = torch.Generator().manual_seed(1)
    text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (3000,), generator=g))
    (folder / "calib.txt").write_text(text)  # a short calibration text: tokenizing all of the KJV takes seconds
    return folder


def quantize_fp8_ckpt(hf: Path, out: Path, tp_size: int = 1, **recipe: object) -> Path:
    req = QuantizeRequest(model_dir=hf, output_dir=out, qformat="fp8", dtype="float32", tp_size=tp_size,
                          calib_dataset=str(hf / "calib.txt"), calib_size=8, calib_max_seq_length=64, device="cpu",
                          **recipe)  # type: ignore[arg-type]
    return quantize(req)


@torch.inference_mode()
def kiln_logits(ckpt: Path, engine: Path, seqs: list[torch.Tensor]) -> torch.Tensor:
    """Build an engine from `ckpt` and run kiln's model (the CPU reference path) on each sequence."""
    build_engine(ckpt, engine, BuildConfig(max_batch_size=1, max_input_len=64, max_seq_len=64), device="cpu")
    llm = LLM(engine, tokenizer_dir=None, device="cpu")
    out = []
    for ids in seqs:
        n = len(ids)
        meta = AttentionMetadata(slot_mapping=torch.arange(n), block_tables=torch.zeros(1, 1, dtype=torch.int32),
                                 seq_lens=[n], query_lens=[n], kv_caches=llm.runner.kv_caches)
        out.append(llm.model.compute_logits(llm.model(ids, torch.arange(n), meta)))
    return torch.cat(out)


def test_recipe_checkpoint_runs_and_is_closer_to_float_than_plain_fp8(tiny_hf, tmp_path):
    ckpts = {"float": convert_hf(tiny_hf, tmp_path / "float", "float32"),
             "plain": quantize_fp8_ckpt(tiny_hf, tmp_path / "plain", smoothquant=0.0, fp8_gptq=False),
             "recipe": quantize_fp8_ckpt(tiny_hf, tmp_path / "recipe", smoothquant=0.5, fp8_gptq=True)}
    written = {k: json.loads((v / "config.json").read_text())["quantization"] for k, v in ckpts.items()}
    assert written["recipe"] == {"quant_algo": "fp8", "group_size": 0, "bits": 8, "smoothquant": 0.5, "gptq": True}
    assert written["plain"] == {"quant_algo": "fp8", "group_size": 0, "bits": 8, "smoothquant": 0.0}
    plain = load_file(str(ckpts["plain"] / "rank0.safetensors"))
    recipe = load_file(str(ckpts["recipe"] / "rank0.safetensors"))
    assert plain.keys() == recipe.keys()  # the same tensors: the format did not change
    assert all(plain[k].dtype == recipe[k].dtype and plain[k].shape == recipe[k].shape for k in plain)
    seqs = [torch.randint(0, 49152, (48,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    logits = {k: kiln_logits(v, tmp_path / f"e-{k}", seqs) for k, v in ckpts.items()}
    err = {k: (logits[k] - logits["float"]).pow(2).mean().item() for k in ("plain", "recipe")}
    assert err["plain"] > 0, "fp8 should change the logits"
    assert err["recipe"] < 0.8 * err["plain"], f"logit MSE vs float: {err}"


def test_default_recipe_shards_at_tp2_equal_the_unsharded_checkpoint(tiny_hf, tmp_path):
    tp1 = quantize_fp8_ckpt(tiny_hf, tmp_path / "tp1")
    written = json.loads((tp1 / "config.json").read_text())["quantization"]
    assert written == {"quant_algo": "fp8", "group_size": 0, "bits": 8, "smoothquant": FP8_SMOOTHQUANT,
                       **({"gptq": True} if FP8_GPTQ else {})}
    full = load_file(str(tp1 / "rank0.safetensors"))
    ranks = [load_file(str(quantize_fp8_ckpt(tiny_hf, tmp_path / "tp2", tp_size=2) / f"rank{r}.safetensors"))
             for r in range(2)]
    assert ranks[0].keys() == full.keys()
    for name, tensor in full.items():
        parts = [r[name] for r in ranks]
        if any(p in name for p in ("o_proj.weight", "down_proj.weight")) and tensor.dim() == 2:
            joined = torch.cat(parts, dim=1)  # row-parallel: input columns split
        elif torch.equal(parts[0], parts[1]) and parts[0].shape == tensor.shape:
            joined = parts[0]  # replicated (norms, row-parallel scales)
        else:
            joined = torch.cat(parts, dim=0)  # column-parallel rows, vocabulary rows
        assert torch.equal(joined.view(torch.uint8) if joined.dtype == torch.float8_e4m3fn else joined,
                           tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor), name


# ---- user mistakes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("qformat, recipe, words", [
    ("fp8", {"smoothquant": -0.1}, r"--smoothquant -0\.1 is out of range: .*between 0 and 1"),
    ("fp8", {"smoothquant": 1.5}, r"--smoothquant 1\.5 is out of range: .*between 0 and 1"),
    ("fp8", {"smoothquant": float("nan")}, r"--smoothquant nan is out of range"),
    ("int4_awq", {"smoothquant": 0.5}, r"--smoothquant 0\.5 applies to --qformat fp8 only, not int4_awq"),
    ("int8_wo", {"fp8_gptq": True}, r"--fp8_gptq enable applies to --qformat fp8 only, not int8_wo"),
])
def test_bad_recipe_flags_are_refused(tmp_path, qformat, recipe, words):
    req = QuantizeRequest(model_dir=tmp_path, output_dir=tmp_path / "x", qformat=qformat, **recipe)
    with pytest.raises(KilnError, match=words):
        req.quant_config()


def test_bad_smoothquant_on_the_command_line_is_a_clear_error(tiny_hf, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "kiln", "quantize", "--model_dir", str(tiny_hf), "--output_dir",
                           str(tmp_path / "x"), "--qformat", "fp8", "--smoothquant", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1 and "--smoothquant 2" in done.stderr and "between 0 and 1" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "x").exists()
