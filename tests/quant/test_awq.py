"""AWQ (kiln.quant.awq): the scale search beats round-to-nearest where a few input channels carry outlier
activations, scaling alone is an exact reparametrization of the float model, the calibration forward is
transformers' forward, and an int4_awq checkpoint built through kiln is closer to the float model than a
round-to-nearest one. Tiny random models only: the whole file runs in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from kiln.builder.build import build_engine
from kiln.checkpoint.convert import convert_hf, read_hf_config, write_checkpoint
from kiln.config import BuildConfig
from kiln.errors import KilnError
from kiln.layers.attention import AttentionMetadata
from kiln.quant import awq, layerwise
from kiln.quant.formats import fake_quantize
from kiln.quant.methods import QuantConfig
from kiln.runtime.engine import LLM

VOCAB = 160
GROUP = 16
BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
)
VARIANTS = {
    "llama-mha": ("Llama", dict(num_key_value_heads=4)),  # v -> o is scaled too
    "llama-gqa-bias": ("Llama", dict(num_key_value_heads=2, attention_bias=True)),  # q/k/v/o bias
    "qwen2-sliding": ("Qwen2", dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=6,
                                    max_window_layers=1)),  # q/k/v bias; layer 1 slides
    "mistral-sliding": ("Mistral", dict(num_key_value_heads=2, sliding_window=7)),
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    """Tiny tensors: one intra-op thread (tests/conftest.py)."""


def tiny_model(folder: Path, variant: str, seed: int = 0, outlier: float = 0.0) -> torch.nn.Module:
    """A random model (norms and biases random too) saved to `folder`. outlier > 0 multiplies 4 channels
    of every decoder norm by it, so those activation channels are outliers, as in real LLMs."""
    family, kwargs = VARIANTS[variant]
    cfg = getattr(transformers, f"{family}Config")(**BASE, **kwargs)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
                if outlier and ".layers." in name:
                    p[torch.randperm(p.numel(), generator=g)[:4]] *= outlier
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(folder))
    return model.eval()


def windows(n: int, length: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=g) for _ in range(n)]


@torch.no_grad()
def hf_logits(
    model: torch.nn.Module, state: dict[str, torch.Tensor], seqs: list[torch.Tensor]
) -> torch.Tensor:
    """`model`'s architecture with the weights `state`: logits of every position, [tokens, vocab]."""
    other = type(model)(model.config).eval()
    other.load_state_dict(state, strict=True)
    return torch.cat([other(input_ids=s[None]).logits[0] for s in seqs])


# ---- the searches on one layer ---------------------------------------------------------------------

def outlier_layer(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [128, 256]; x [1024, 256] with 8 input channels scaled 10x .. 50x."""
    g = torch.Generator().manual_seed(seed)
    w = 0.05 * torch.randn(128, 256, generator=g)
    x = torch.randn(1024, 256, generator=g)
    x[:, torch.randperm(256, generator=g)[:8]] *= torch.linspace(10, 50, 8)
    return w, x


@pytest.mark.parametrize("group", [32, 128])
def test_scale_search_beats_round_to_nearest_on_outlier_channels(group):
    w, x = outlier_layer(seed=group)
    ref = x @ w.T  # [1024, 128]
    rtn = (x @ fake_quantize(w, 4, group, symmetric=False).T - ref).pow(2).mean()
    # searched on the first half of the tokens, measured on all of them
    s = awq.search_scale(x.abs().mean(0), x[:512], [w], group)
    got = ((x / s) @ fake_quantize(w * s, 4, group, symmetric=False).T - ref).pow(2).mean()
    assert got < 0.5 * rtn, f"AWQ output MSE {got:.4g} vs RTN {rtn:.4g} (ratio {got / rtn:.3f})"


def test_clip_search_clamps_groups_and_never_does_worse():
    w, x = outlier_layer(seed=1)
    w[:, 5] *= 8  # one heavy column: every row's first group has a single large weight
    clipped = awq.clip_weight(w, x[:512], GROUP)
    assert torch.all(clipped.abs() <= w.abs()) and torch.all(clipped.sign() * w.sign() >= 0)
    assert (clipped != w).any(dim=1).float().mean() > 0.5, "most rows should clip their heavy group"
    ref = x[:512] @ w.T
    err = {name: ((x[:512] @ fake_quantize(v, 4, GROUP, symmetric=False).T) - ref).pow(2).mean()
           for name, v in (("rtn", w), ("clipped", clipped))}
    assert err["clipped"] <= err["rtn"], err


# ---- the transform on whole models -----------------------------------------------------------------

@pytest.mark.parametrize("variant", ["qwen2-sliding", "mistral-sliding"])
def test_calibration_forward_matches_transformers(tmp_path, variant):
    model = tiny_model(tmp_path, variant)
    cfg = read_hf_config(tmp_path)
    ids = windows(1, 32, seed=1)[0]  # longer than the sliding windows
    with torch.no_grad():
        want = model(input_ids=ids[None], output_hidden_states=True).hidden_states  # embed, layer outputs
    state = {n: p.detach() for n, p in model.state_dict().items()}
    x, rope = want[0][0], layerwise.rope_tables(cfg, 32, "cpu")
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}."
        w = {n[len(prefix):]: t for n, t in state.items() if n.startswith(prefix)}
        x = layerwise.layer_forward(cfg, i, w, x, rope, lambda name, t: None)
        if i + 1 < cfg.num_layers:  # transformers' last entry is after the final norm
            torch.testing.assert_close(x, want[i + 1][0], atol=1e-5, rtol=1e-5)
    final = layerwise.rms_norm(x, state["model.norm.weight"], cfg.rms_norm_eps)
    torch.testing.assert_close(final, want[-1][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["llama-mha", "llama-gqa-bias", "qwen2-sliding"])
def test_scaling_alone_preserves_the_float_model(tmp_path, monkeypatch, variant):
    model = tiny_model(tmp_path, variant, outlier=20.0)
    monkeypatch.setattr(awq, "CLIP_SHRINKS", (1.0,))  # no clipping: only the exact reparametrization
    cfg = read_hf_config(tmp_path)
    out = dict(awq.awq_transform(tmp_path, cfg, windows(4, 48, seed=1), GROUP, progress=False))
    orig = {n: p.detach().clone() for n, p in model.state_dict().items()}
    assert out.keys() == orig.keys() and all(t.dtype == torch.float32 for t in out.values())
    for name in ("model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
                 "model.layers.1.mlp.down_proj.weight"):
        assert (out[name] - orig[name]).abs().max() > 1e-2, f"{name}: no scale was applied"
    o_name = "model.layers.0.self_attn.o_proj.weight"
    o_changed = not torch.equal(out[o_name], orig[o_name])
    assert o_changed == (variant == "llama-mha"), "v -> o is scaled exactly when v's outputs are o's inputs"
    seqs = windows(2, 40, seed=2)
    got, want = hf_logits(model, out, seqs), hf_logits(model, orig, seqs)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def kiln_logits(ckpt: Path, engine: Path, seqs: list[torch.Tensor]) -> torch.Tensor:
    """Build an engine from `ckpt` and run kiln's model on each sequence: [tokens, vocab]."""
    build_engine(ckpt, engine, BuildConfig(max_batch_size=1, max_input_len=64, max_seq_len=64), device="cpu")
    llm = LLM(engine, tokenizer_dir=None, device="cpu")
    out = []
    for ids in seqs:
        n = len(ids)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(n), block_tables=torch.zeros(1, 1, dtype=torch.int32),
            seq_lens=[n], query_lens=[n], kv_caches=llm.runner.kv_caches,
        )
        out.append(llm.model.compute_logits(llm.model(ids, torch.arange(n), meta)))
    return torch.cat(out)


def test_awq_checkpoint_is_closer_to_float_than_round_to_nearest(tmp_path):
    hf = tmp_path / "hf"
    tiny_model(hf, "llama-gqa-bias", outlier=20.0)
    cfg = read_hf_config(hf)
    quant = QuantConfig("int4_awq", GROUP)
    convert_hf(hf, tmp_path / "float", "float32")
    convert_hf(hf, tmp_path / "rtn", "float32", quant=quant)  # the same format, round-to-nearest
    stream = awq.awq_transform(hf, cfg, windows(8, 64, seed=1), GROUP, progress=False)
    write_checkpoint(cfg, stream, tmp_path / "awq", "float32", 1, quant)
    seqs = windows(4, 48, seed=2)  # not the calibration tokens
    ref = kiln_logits(tmp_path / "float", tmp_path / "e-float", seqs)
    err = {name: (kiln_logits(tmp_path / name, tmp_path / f"e-{name}", seqs) - ref).pow(2).mean().item()
           for name in ("rtn", "awq")}
    assert err["rtn"] > 1e-3, f"int4 should visibly change the logits: {err}"
    assert err["awq"] < 0.8 * err["rtn"], f"logit MSE vs float: {err} (ratio {err['awq'] / err['rtn']:.3f})"


# ---- user mistakes ---------------------------------------------------------------------------------

def test_group_size_not_dividing_the_hidden_size_is_refused(tmp_path):
    tiny_model(tmp_path, "llama-mha")
    with pytest.raises(KilnError, match=r"group size 24 does not divide .*hidden size 64"):
        awq.awq_transform(tmp_path, read_hf_config(tmp_path), windows(1, 8, seed=1), 24, progress=False)


@pytest.mark.parametrize("calib, words", [
    ([], "empty"),
    ([torch.zeros(2, 4, dtype=torch.int64)], "1-D"),
    ([torch.tensor([1, VOCAB])], "outside the vocabulary"),
])
def test_bad_calibration_data_is_refused(tmp_path, calib, words):
    tiny_model(tmp_path, "llama-mha")
    with pytest.raises(KilnError, match=words):
        awq.awq_transform(tmp_path, read_hf_config(tmp_path), calib, GROUP, progress=False)
