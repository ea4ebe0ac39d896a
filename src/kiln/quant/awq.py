"""Activation-aware weight quantization (AWQ, Lin et al. 2023, arXiv 2306.00978) as a weight transform.

Why: round-to-nearest int4 spreads its 16 levels evenly over each group of weights, but a few input
channels carry activations 10-100x larger than the rest, and the rounding error on their weights dominates
the layer's output error. AWQ multiplies those channels' weight columns by s > 1 before quantizing (so they
get relatively finer steps) and divides the activations by s, folding 1/s into the op before (a norm
weight, or the previous linear's output rows): in float that is the same function exactly. It then clamps
each group of weights to a searched range where cutting a few large weights lowers the output error.

The transform streams: one decoder layer at a time is loaded, run on the calibration tokens, searched,
transformed and yielded, so peak memory is about one layer's weights plus the calibration activations.
It yields plain float weights; kiln's int4_awq format (`quantize_asymmetric_int4` per group of input
columns, as write_checkpoint applies it) then quantizes them round-to-nearest, and since the clipping is
done by clamping the weights, each group's min/max already is the searched range.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
from kiln.quant.formats import fake_quantize

ALPHA_GRID = tuple(i / 20 for i in range(20))  # exponents of s = x_mean**alpha tried; 0 is plain RTN
CLIP_SHRINKS = tuple(1.0 - 0.5 * i / 19 for i in range(20))  # fractions of a group's max |w| tried
CLIP_TOKENS = 512  # calibration rows the clip search measures on (as AutoAWQ)
_CHUNK_ELEMENTS = 1 << 25  # bound on the [groups, tokens, rows] error tensor of the clip search

Weights = dict[str, torch.Tensor]  # one decoder layer's tensors by short name ("mlp.up_proj.weight")
Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: [positions, head_dim]

_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_REQUIRED = ("input_layernorm.weight", "post_attention_layernorm.weight", *(f"{n}.weight" for n in _LINEARS))


@dataclass(frozen=True)
class _Group:
    """Linears that read one input, and the op that produces it (where 1/s is folded)."""

    tap: str  # which captured input (see _layer_forward)
    prev: str  # a norm, or a linear whose output rows are the input channels
    linears: tuple[str, ...]


_GROUPS = (
    _Group("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    _Group("o", "self_attn.v_proj", ("self_attn.o_proj",)),  # only without GQA (see _scale_layer)
    _Group("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    _Group("down", "mlp.up_proj", ("mlp.down_proj",)),
)
# q and k are not clipped (as in AutoAWQ): their errors reach the output through q.k and the softmax,
# which the per-group partial dot products of the clip search do not model.
_CLIPPED = {"self_attn.v_proj": "qkv", "self_attn.o_proj": "o", "mlp.gate_proj": "gate_up",
            "mlp.up_proj": "gate_up", "mlp.down_proj": "down"}


@dataclass
class _Tap:
    """One linear group's input over the calibration tokens: sum of |x| per channel and sampled rows."""

    abs_sum: torch.Tensor | None = None  # [in]
    count: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor, pick: torch.Tensor) -> None:
        """x: [tokens, in]; pick: [k] indices of the rows kept for the searches."""
        total = x.abs().sum(0)  # [in]
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        self.count += x.shape[0]
        self.rows.append(x[pick])

    def mean(self) -> torch.Tensor:
        return self.abs_sum / self.count  # type: ignore[operator]

    def samples(self) -> torch.Tensor:
        if len(self.rows) > 1:
            self.rows = [torch.cat(self.rows)]
        return self.rows[0]  # [k, in]

    def scale_inputs(self, s: torch.Tensor) -> None:
        """The linears now see x / s."""
        self.rows = [self.samples() / s]


def awq_transform(
    model_dir: Path, cfg: ModelConfig, calib: list[torch.Tensor], group_size: int,
    device: str = "cpu", progress: bool = True, max_search_tokens: int = 2048,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor of the HF model (HF names, float32) with AWQ's scales and clipping applied:
    norm weights divided by the per-channel scales, linear weights' input columns multiplied by them,
    weights clipped to the searched per-group range. Quantizing the yielded linear weights with
    quantize_asymmetric_int4(w, group_size) then gives AWQ's int4 checkpoint.

    Arguments are checked here, before the first tensor is asked for (KilnError on a user mistake).
    """
    _check_args(cfg, calib, group_size, device, max_search_tokens)
    index = _tensor_index(hf_weight_files(Path(model_dir)))
    if "model.embed_tokens.weight" not in index:
        raise KilnError(f"{model_dir}: no tensor model.embed_tokens.weight; is this a Llama-family model?")
    return _transform(index, cfg, calib, group_size, device, progress, max_search_tokens)


@torch.no_grad()  # on a generator function, torch restores the caller's grad mode around each yield
def _transform(
    index: dict[str, Path], cfg: ModelConfig, calib: list[torch.Tensor], group_size: int,
    device: str, progress: bool, max_search_tokens: int,
) -> Iterator[tuple[str, torch.Tensor]]:
    by_layer = _names_by_layer(index, cfg.num_layers)
    for name in by_layer[None]:  # embeddings, final norm, lm_head: unchanged
        yield name, _load(index, [name], "cpu")[name]
    embed = _load(index, ["model.embed_tokens.weight"], device)["model.embed_tokens.weight"]
    hidden = [embed[ids.to(device)] for ids in calib]  # per window [tokens, hidden]
    del embed
    picks = [p.to(device) for p in _pick_rows([len(ids) for ids in calib], max_search_tokens)]
    rope = _rope_tables(cfg, max(len(ids) for ids in calib), device)
    for i in tqdm(range(cfg.num_layers), desc="AWQ", unit="layer", disable=not progress):
        prefix = f"model.layers.{i}."
        w = {n[len(prefix):]: t for n, t in _load(index, by_layer[i], device).items()}
        missing = [prefix + n for n in _REQUIRED if n not in w]
        if missing:
            raise KilnError(f"the model has no tensor {missing[0]}; is the download complete?")
        taps = _calibrate_layer(cfg, i, w, hidden, picks, rope)
        _scale_layer(w, taps, group_size)
        _clip_layer(w, taps, group_size)
        for name, tensor in w.items():
            yield prefix + name, tensor.cpu()


def _check_args(
    cfg: ModelConfig, calib: list[torch.Tensor], group_size: int, device: str, max_search_tokens: int
) -> None:
    sizes = (("hidden size", cfg.hidden_size), ("intermediate size", cfg.intermediate_size),
             ("attention size (heads x head_dim)", cfg.num_heads * cfg.head_dim))
    if group_size < 0:
        raise KilnError(f"AWQ group size {group_size} is invalid: use a divisor of the hidden size, or 0")
    for what, size in sizes:
        if group_size and size % group_size:
            raise KilnError(f"AWQ group size {group_size} does not divide the model's {what} {size}: "
                            "choose a group size that divides it (e.g. 32, 64 or 128), or 0 for per-channel")
    if not calib:
        raise KilnError("AWQ needs calibration tokens: the list of calibration windows is empty")
    for j, ids in enumerate(calib):
        if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point():
            raise KilnError(f"calibration window {j} must be a non-empty 1-D tensor of token ids, "
                            f"not {ids.dtype} of shape {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
            raise KilnError(f"calibration window {j} holds a token id outside the vocabulary "
                            f"(0..{cfg.vocab_size - 1})")
    if max_search_tokens < 1:
        raise KilnError(f"max_search_tokens {max_search_tokens} is invalid: it must be 1 or more")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KilnError(f"device {device!r}: no CUDA GPU is visible here; use device 'cpu'")


# ---- loading ---------------------------------------------------------------------------------------

def _tensor_index(files: list[Path]) -> dict[str, Path]:
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


def _names_by_layer(index: dict[str, Path], num_layers: int) -> dict[int | None, list[str]]:
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


def _load(index: dict[str, Path], names: list[str], device: str) -> dict[str, torch.Tensor]:
    """The named tensors as float32 on `device`, each file opened once."""
    out: dict[str, torch.Tensor] = {}
    for path in dict.fromkeys(index[n] for n in names):
        with safe_open(str(path), framework="pt") as f:
            for name in (n for n in names if index[n] == path):
                out[name] = f.get_tensor(name).to(device=device, dtype=torch.float32)
    return out


def _pick_rows(lengths: list[int], k: int) -> list[torch.Tensor]:
    """A fixed random subsample of at most k of all calibration tokens, as row indices per window."""
    total = sum(lengths)
    flat = torch.arange(total)
    if total > k:
        flat = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:k].sort().values
    picks, start = [], 0
    for n in lengths:
        picks.append(flat[(flat >= start) & (flat < start + n)] - start)
        start += n
    return picks


# ---- the dense float32 forward ---------------------------------------------------------------------

def _rope_tables(cfg: ModelConfig, positions: int, device: str) -> Rope:
    inv = inverse_frequencies(cfg.head_dim, cfg.rope, device)  # [head_dim // 2]
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32, device=device), inv)  # [pos, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [pos, head_dim]
    return emb.cos(), emb.sin()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))  # [tokens, hidden]


def _linear(w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def _attention(cfg: ModelConfig, window: int, w: Weights, h: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Causal (optionally sliding-window) GQA self-attention of one sequence before o_proj:
    h [tokens, hidden] -> [tokens, heads * head_dim]."""
    n, d = h.shape[0], cfg.head_dim
    q = _linear(w, "self_attn.q_proj", h).view(n, cfg.num_heads, d).transpose(0, 1)  # [heads, n, D]
    k = _linear(w, "self_attn.k_proj", h).view(n, cfg.num_kv_heads, d).transpose(0, 1)  # [kv, n, D]
    v = _linear(w, "self_attn.v_proj", h).view(n, cfg.num_kv_heads, d).transpose(0, 1)  # [kv, n, D]
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


def _layer_forward(
    cfg: ModelConfig, i: int, w: Weights, x: torch.Tensor, rope: Rope,
    tap: Callable[[str, torch.Tensor], None],
) -> torch.Tensor:
    """Decoder layer i on one sequence, x [tokens, hidden] -> [tokens, hidden]; `tap(name, input)` sees
    the input of each linear group."""
    eps = cfg.rms_norm_eps
    h = _rms_norm(x, w["input_layernorm.weight"], eps)  # [n, hidden]
    tap("qkv", h)
    a = _attention(cfg, cfg.sliding_windows[i], w, h, rope)  # [n, heads * D]
    tap("o", a)
    x = x + _linear(w, "self_attn.o_proj", a)
    h = _rms_norm(x, w["post_attention_layernorm.weight"], eps)
    tap("gate_up", h)
    act = F.silu(_linear(w, "mlp.gate_proj", h)) * _linear(w, "mlp.up_proj", h)  # [n, intermediate]
    tap("down", act)
    return x + _linear(w, "mlp.down_proj", act)


def _calibrate_layer(
    cfg: ModelConfig, i: int, w: Weights, hidden: list[torch.Tensor], picks: list[torch.Tensor], rope: Rope
) -> dict[str, _Tap]:
    """Run layer i on every window, capturing its linear groups' inputs; replaces `hidden` (in place)
    with the layer's outputs.

    The outputs come from the original weights, before this layer's scales and clipping (as AutoAWQ):
    scaling is exact, so the only difference would be the clipping, and clipped float weights are still
    not the quantized ones the next layer will really see; the original activations cost no second
    forward pass. On tiny random 4-layer models, feeding the next layer from the original, the clipped
    float or the fake-quantized weights made no consistent difference to the final logit error.
    """
    taps = {g.tap: _Tap() for g in _GROUPS}
    for j, (x, pick) in enumerate(zip(hidden, picks)):
        hidden[j] = _layer_forward(cfg, i, w, x, rope, lambda name, t, p=pick: taps[name].add(t, p))
    return taps


# ---- the searches ----------------------------------------------------------------------------------

def _scale_layer(w: Weights, taps: dict[str, _Tap], group_size: int) -> None:
    """Search and apply each group's per-channel scales, in place; the taps' rows become x / s."""
    for g in _GROUPS:
        prev = w[f"{g.prev}.weight"]
        first = w[f"{g.linears[0]}.weight"]
        if prev.dim() == 2 and prev.shape[0] != first.shape[1]:
            continue  # v -> o under GQA: a v channel feeds several o columns, one scale cannot fold
        tap = taps[g.tap]
        s = search_scale(tap.mean(), tap.samples(), [w[f"{n}.weight"] for n in g.linears], group_size)
        for name in g.linears:
            w[f"{name}.weight"] = w[f"{name}.weight"] * s  # [out, in] * [in]
        if prev.dim() == 1:
            w[f"{g.prev}.weight"] = prev / s  # norm weight [in]
        else:
            w[f"{g.prev}.weight"] = prev / s[:, None]  # output rows [in, prev_in]
            if f"{g.prev}.bias" in w:
                w[f"{g.prev}.bias"] = w[f"{g.prev}.bias"] / s
        tap.scale_inputs(s)


def search_scale(
    x_mean: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor], group_size: int
) -> torch.Tensor:
    """AWQ's grid search: s = x_mean**alpha (normalized) minimizing the int4 output error of the linears.

    x_mean: [in] mean |x| per channel; x: [n, in] sampled inputs; weights: [out_k, in] each.
    Returns s [in]; all ones (plain round-to-nearest) when no alpha > 0 does better.
    """
    w = torch.cat(weights)  # [out, in]
    ref = x @ w.T  # [n, out]
    best_loss, best = math.inf, torch.ones_like(x_mean)
    for alpha in ALPHA_GRID:
        s = x_mean.pow(alpha).clamp(min=1e-4)  # [in]
        s = s / (s.max() * s.min()).sqrt()
        wq = fake_quantize(w * s, 4, group_size, symmetric=False)  # [out, in]
        loss = ((x / s) @ wq.T - ref).pow(2).mean().item()
        if loss < best_loss:
            best_loss, best = loss, s
    return best


def _clip_layer(w: Weights, taps: dict[str, _Tap], group_size: int) -> None:
    for name, tap in _CLIPPED.items():
        x = taps[tap].samples()  # [k, in], already divided by this group's scales
        if x.shape[0] > CLIP_TOKENS:
            x = x[torch.linspace(0, x.shape[0] - 1, CLIP_TOKENS, device=x.device).long()]
        w[f"{name}.weight"] = clip_weight(w[f"{name}.weight"], x, group_size)


def clip_weight(w: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """AWQ's clip search: clamp each group of w [out, in] to [-m, m], m = shrink * max|w| with the shrink
    in CLIP_SHRINKS whose int4 error on the group's partial dot products with x [n, in] is least."""
    out_f, in_f = w.shape
    g = group_size or in_f
    xg = x.view(x.shape[0], in_f // g, g).transpose(0, 1)  # [groups, n, g]
    rows = max(1, _CHUNK_ELEMENTS // (x.shape[0] * (in_f // g)))
    return torch.cat([_clip_rows(w[r : r + rows], xg, group_size) for r in range(0, out_f, rows)])


def _clip_rows(w: torch.Tensor, xg: torch.Tensor, group_size: int) -> torch.Tensor:
    """clip_weight for a block of rows, w [o, in], xg [groups, n, g] -> clamped w [o, in]."""
    o, in_f = w.shape
    groups, _, g = xg.shape
    wg = w.view(o, groups, g)
    top = wg.abs().amax(-1, keepdim=True)  # [o, groups, 1]
    best_err = torch.full_like(top, math.inf)
    best = top
    for shrink in CLIP_SHRINKS:
        m = top * shrink  # [o, groups, 1]
        wq = fake_quantize(torch.clamp(wg, -m, m).reshape(o, in_f), 4, group_size, symmetric=False)
        dq = wq.view(o, groups, g) - wg  # [o, groups, g]
        err = torch.bmm(xg, dq.permute(1, 2, 0)).pow(2).mean(1)  # [groups, n, o] -> [groups, o]
        err = err.T.unsqueeze(-1)  # [o, groups, 1]
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, m, best)
    return torch.clamp(wg, -best, best).reshape(o, in_f)
