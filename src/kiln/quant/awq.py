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

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kiln.config import ModelConfig
from kiln.errors import KilnError
from kiln.quant.formats import fake_quantize
from kiln.quant.layerwise import SITES, Rope, Weights, fold, layer_forward, open_model, transform_layers

ALPHA_GRID = tuple(i / 20 for i in range(20))  # exponents of s = x_mean**alpha tried; 0 is plain RTN
CLIP_SHRINKS = tuple(1.0 - 0.5 * i / 19 for i in range(20))  # fractions of a group's max |w| tried
CLIP_TOKENS = 512  # calibration rows the clip search measures on (as AutoAWQ)
_CHUNK_ELEMENTS = 1 << 25  # bound on the [groups, tokens, rows] error tensor of the clip search

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
    _check_args(cfg, group_size, max_search_tokens)
    index = open_model(model_dir, cfg, calib, device)
    picks = [p.to(device) for p in _pick_rows([len(ids) for ids in calib], max_search_tokens)]

    def layer(i: int, w: Weights, hidden: list[torch.Tensor], rope: Rope) -> None:
        taps = _calibrate_layer(cfg, i, w, hidden, picks, rope)
        _scale_layer(w, taps, group_size)
        _clip_layer(w, taps, group_size)

    return transform_layers(index, cfg, calib, device, progress, "AWQ", layer)


def _check_args(cfg: ModelConfig, group_size: int, max_search_tokens: int) -> None:
    sizes = (("hidden size", cfg.hidden_size), ("intermediate size", cfg.intermediate_size),
             ("attention size (heads x head_dim)", cfg.num_heads * cfg.head_dim))
    if group_size < 0:
        raise KilnError(f"AWQ group size {group_size} is invalid: use a divisor of the hidden size, or 0")
    for what, size in sizes:
        if group_size and size % group_size:
            raise KilnError(f"AWQ group size {group_size} does not divide the model's {what} {size}: "
                            "choose a group size that divides it (e.g. 32, 64 or 128), or 0 for per-channel")
    if max_search_tokens < 1:
        raise KilnError(f"max_search_tokens {max_search_tokens} is invalid: it must be 1 or more")


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
    taps = {g.tap: _Tap() for g in SITES}
    for j, (x, pick) in enumerate(zip(hidden, picks)):
        hidden[j] = layer_forward(cfg, i, w, x, rope, lambda name, t, p=pick: taps[name].add(t, p))
    return taps


# ---- the searches ----------------------------------------------------------------------------------

def _scale_layer(w: Weights, taps: dict[str, _Tap], group_size: int) -> None:
    """Search and apply each site's per-channel scales, in place; the taps' rows become x / s."""
    for site in SITES:
        prev = w[f"{site.prev}.weight"]
        if prev.dim() == 2 and prev.shape[0] != w[f"{site.linears[0]}.weight"].shape[1]:
            continue  # v -> o under GQA: a v channel feeds several o columns, one scale cannot fold
        tap = taps[site.tap]
        s = search_scale(tap.mean(), tap.samples(), [w[f"{n}.weight"] for n in site.linears], group_size)
        fold(w, site, s)
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
