"""Layer-by-layer calibration shared by the calibrated recipes (int4_awq's AWQ, fp8's smoothing and GPTQ).

Why: a calibrated recipe needs each linear's inputs on real text, but holding the whole model and every
layer's activations at once does not fit for large models. So the model streams: embeddings first, then
one decoder layer at a time is loaded, run on the calibration tokens in float32 (a plain dense forward,
checked against transformers' in the tests), transformed by the recipe and yielded; its outputs become
the next layer's inputs. Peak memory is about one layer's weights plus the calibration activations.

Per-channel factors are folded the same way by every recipe: each `Site` names the linears that read
one input and the op producing it, and `fold` multiplies the linears' input columns by s while dividing
the producer (a norm's weight, or a linear's output rows) by s, which leaves the float model unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from tqdm import tqdm  # a dependency of transformers (and of huggingface_hub)

from kiln.checkpoint.safetensors_io import hf_weight_files
from kiln.config import ModelConfig
from kiln.errors import KilnError
from kiln.kernels.reference import rotate_half
from kiln.layers.rotary import inverse_frequencies

Weights = dict[str, torch.Tensor]  # one decoder layer's tensors by short name ("mlp.up_proj.weight")
Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [positions, head_dim]
Tap = Callable[[str, torch.Tensor], None]  # sees (a site's tap name, that site's input [tokens, in])
# transforms layer i's weights in place and replaces hidden[j] by the layer's output on window j
LayerFn = Callable[[int, Weights, list[torch.Tensor], Rope], None]

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
REQUIRED = ("input_layernorm.weight", "post_attention_layernorm.weight", *(f"{n}.weight" for n in LINEARS))


@dataclass(frozen=True)
class Site:
    """Linears that read one input, and the op that produces it (where 1/s is folded)."""

    tap: str  # which captured input (see layer_forward)
    prev: str  # a norm, or a linear whose output rows are the input channels
    linears: tuple[str, ...]


SITES = (
    Site("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Site("o", "self_attn.v_proj", ("self_attn.o_proj",)),  # under GQA only with factors shared per kv head
    Site("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Site("down", "mlp.up_proj", ("mlp.down_proj",)),
)


def fold(w: Weights, site: Site, s: torch.Tensor, s_prev: torch.Tensor | None = None) -> None:
    """Multiply the site's linears' input columns by s [in]; divide the producing op by s_prev (default
    s): a norm's weight [in], or a linear's output rows [in, prev_in] and its bias [in]. In place."""
    s_prev = s if s_prev is None else s_prev
    for name in site.linears:
        w[f"{name}.weight"] = w[f"{name}.weight"] * s  # [out, in] * [in]
    prev = w[f"{site.prev}.weight"]
    w[f"{site.prev}.weight"] = prev / s_prev if prev.dim() == 1 else prev / s_prev[:, None]
    if f"{site.prev}.bias" in w:
        w[f"{site.prev}.bias"] = w[f"{site.prev}.bias"] / s_prev


# ---- the stream ------------------------------------------------------------------------------------

def open_model(model_dir: Path, cfg: ModelConfig, calib: list[torch.Tensor], device: str) -> dict[str, Path]:
    """Check the calibration windows and device, index the model's tensors (KilnError on a user mistake)."""
    check_calibration(cfg, calib, device)
    index = tensor_index(hf_weight_files(Path(model_dir)))
    if "model.embed_tokens.weight" not in index:
        raise KilnError(f"{model_dir}: no tensor model.embed_tokens.weight; is this a Llama-family model?")
    return index


@torch.no_grad()  # on a generator function, torch restores the caller's grad mode around each yield
def transform_layers(
    index: dict[str, Path], cfg: ModelConfig, calib: list[torch.Tensor], device: str, progress: bool,
    desc: str, layer_fn: LayerFn,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor of the model (HF names, float32, on the CPU), each decoder layer after
    `layer_fn` has calibrated and transformed it."""
    by_layer = names_by_layer(index, cfg.num_layers)
    for name in by_layer[None]:  # embeddings, final norm, lm_head: unchanged
        yield name, load(index, [name], "cpu")[name]
    embed = load(index, ["model.embed_tokens.weight"], device)["model.embed_tokens.weight"]
    hidden = [embed[ids.to(device)] for ids in calib]  # per window [tokens, hidden]
    del embed
    rope = rope_tables(cfg, max(len(ids) for ids in calib), device)
    for i in tqdm(range(cfg.num_layers), desc=desc, unit="layer", disable=not progress):
        prefix = f"model.layers.{i}."
        w = {n[len(prefix):]: t for n, t in load(index, by_layer[i], device).items()}
        missing = [prefix + n for n in REQUIRED if n not in w]
        if missing:
            raise KilnError(f"the model has no tensor {missing[0]}; is the download complete?")
        layer_fn(i, w, hidden, rope)
        for name, tensor in w.items():
            yield prefix + name, tensor.cpu()


def check_calibration(cfg: ModelConfig, calib: list[torch.Tensor], device: str) -> None:
    if not calib:
        raise KilnError("calibration needs tokens: the list of calibration windows is empty")
    for j, ids in enumerate(calib):
        if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point():
            raise KilnError(f"calibration window {j} must be a non-empty 1-D tensor of token ids, "
                            f"not {ids.dtype} of shape {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
            raise KilnError(f"calibration window {j} holds a token id outside the vocabulary "
                            f"(0..{cfg.vocab_size - 1})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KilnError(f"device {device!r}: no CUDA GPU is visible here; use device 'cpu'")


# ---- loading ---------------------------------------------------------------------------------------

def tensor_index(files: list[Path]) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (read from the files' headers only)."""
    index: dict[str, Path] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                index.update(dict.fromkeys(f.keys(), path))
        except (SafetensorError, OSError, json.JSONDecodeError) as e:
            raise KilnError(
                f"{path} is not a readable safetensors file ({e}); re-create or re-download it"
            ) from None
    return index


def names_by_layer(index: dict[str, Path], num_layers: int) -> dict[int | None, list[str]]:
    """Tensor names per decoder layer; key None holds the rest (embeddings, final norm, head)."""
    out: dict[int | None, list[str]] = {i: [] for i in range(num_layers)}
    out[None] = []
    for name in index:
        parts = name.split(".")
        layer = int(parts[2]) if name.startswith("model.layers.") and parts[2].isdigit() else None
        if layer is not None and layer not in out:
            raise KilnError(f"tensor {name} is for layer {layer}, but config.json has {num_layers} layers")
        out[layer].append(name)
    return out


def load(index: dict[str, Path], names: list[str], device: str) -> dict[str, torch.Tensor]:
    """The named tensors as float32 on `device`, each file opened once."""
    out: dict[str, torch.Tensor] = {}
    for path in dict.fromkeys(index[n] for n in names):
        with safe_open(str(path), framework="pt") as f:
            for name in (n for n in names if index[n] == path):
                out[name] = f.get_tensor(name).to(device=device, dtype=torch.float32)
    return out


# ---- the dense float32 forward ---------------------------------------------------------------------

def rope_tables(cfg: ModelConfig, positions: int, device: str) -> Rope:
    inv = inverse_frequencies(cfg.head_dim, cfg.rope, device)  # [head_dim // 2]
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32, device=device), inv)  # [pos, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [pos, head_dim]
    return emb.cos(), emb.sin()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))  # [tokens, hidden]


def linear(w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def attention(cfg: ModelConfig, window: int, w: Weights, h: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Causal (optionally sliding-window) GQA self-attention of one sequence before o_proj:
    h [tokens, hidden] -> [tokens, heads * head_dim]."""
    n, d = h.shape[0], cfg.head_dim
    q = linear(w, "self_attn.q_proj", h).view(n, cfg.num_heads, d).transpose(0, 1)  # [heads, n, D]
    k = linear(w, "self_attn.k_proj", h).view(n, cfg.num_kv_heads, d).transpose(0, 1)  # [kv, n, D]
    v = linear(w, "self_attn.v_proj", h).view(n, cfg.num_kv_heads, d).transpose(0, 1)  # [kv, n, D]
    cos, sin = rope[0][:n], rope[1][:n]  # [n, D]
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    rep = cfg.num_heads // cfg.num_kv_heads
    k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)  # [heads, n, D]
    pos = torch.arange(n, device=h.device)
    visible = pos[None, :] <= pos[:, None]  # [query, key]
    if window > 0:
        visible &= pos[None, :] > pos[:, None] - window
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=d**-0.5)  # [heads, n, D]
    return out.transpose(0, 1).reshape(n, cfg.num_heads * d)


def layer_forward(cfg: ModelConfig, i: int, w: Weights, x: torch.Tensor, rope: Rope, tap: Tap) -> torch.Tensor:
    """Decoder layer i on one sequence, x [tokens, hidden] -> [tokens, hidden]; `tap(name, input)` sees
    the input of each site's linears (SITES' tap names)."""
    eps = cfg.rms_norm_eps
    h = rms_norm(x, w["input_layernorm.weight"], eps)  # [n, hidden]
    tap("qkv", h)
    a = attention(cfg, cfg.sliding_windows[i], w, h, rope)  # [n, heads * D]
    tap("o", a)
    x = x + linear(w, "self_attn.o_proj", a)
    h = rms_norm(x, w["post_attention_layernorm.weight"], eps)
    tap("gate_up", h)
    act = F.silu(linear(w, "mlp.gate_proj", h)) * linear(w, "mlp.up_proj", h)  # [n, intermediate]
    tap("down", act)
    return x + linear(w, "mlp.down_proj", act)
