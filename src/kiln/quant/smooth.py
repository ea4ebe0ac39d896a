"""SmoothQuant-style activation smoothing (Xiao et al. 2022, arXiv 2211.10438) for fp8 W8A8.

Why: fp8 quantizes each token's activations with one scale, its largest magnitude. A few input channels
of an LLM carry values 100x or more above the rest, so the rest of that token lands near the bottom of
e4m3's range, where its steps are coarse (subnormals) or zero. Dividing input channel j by
    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)
(max over the calibration tokens, and over the weight column j of every linear reading that input) and
multiplying weight column j by s_j leaves X W^T unchanged in exact arithmetic while flattening the
spread within a token; alpha moves the difficulty between activations (alpha 0: none moved) and
weights (alpha 1: all of it). Each e4m3 weight row keeps its own scale, so the weights absorb it well.
Unlike int8's uniform steps, e4m3's relative rounding error is the same at every magnitude, so this pays
only where outliers push a token's other values into the subnormals (about 30,000x below its maximum):
on SmolLM2-135M it measured no gain over GPTQ alone, and fp8's default leaves it off (BENCHMARKS.md).

The factors are folded into weights that exist anyway, so the checkpoint format and the runtime do not
change: 1/s goes into the op producing the input (a norm's weight, or the output rows of v_proj /
up_proj), s into the reading linears' columns. v -> o_proj under grouped-query attention: o's input
channel (head h, dim d) comes from v's row (kv head of h, d), read by every q head of the group, so o's
factors are computed per (kv head, d) over all heads of the group and repeated for each of them.
"""

from __future__ import annotations

import torch

from kiln.quant.layerwise import SITES, Site, Weights, fold

FLOOR = 1e-5  # lower bound of max|X_j| and max|W_j| (a dead channel keeps a finite factor)


def smoothing_factors(x_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [in] for the input channels of `weights` ([out_k, in] each), from x_max [in] = max |x| per channel."""
    w_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0)  # [in]
    return _factors(x_max.float(), w_max.float(), alpha)


def gqa_smoothing_factors(
    x_max: torch.Tensor, o_weight: torch.Tensor, alpha: float, num_kv_heads: int, heads_per_kv: int
) -> torch.Tensor:
    """o_proj's factors under GQA, one per (kv head, dim): [num_kv_heads * head_dim], v_proj's row order.

    x_max [heads * head_dim] and o_weight [hidden, heads * head_dim] are pooled (max) over the heads_per_kv
    consecutive heads that read one kv head; o's column factors are the result repeated per head
    (`expand_gqa`)."""
    def pool(v: torch.Tensor) -> torch.Tensor:
        return v.float().view(num_kv_heads, heads_per_kv, -1).amax(1).flatten()  # [kv * head_dim]

    return _factors(pool(x_max), pool(o_weight.abs().amax(0)), alpha)


def expand_gqa(s_kv: torch.Tensor, num_kv_heads: int, heads_per_kv: int) -> torch.Tensor:
    """[kv * head_dim] per-(kv head, dim) factors -> [heads * head_dim], one copy per q head of the group."""
    s = s_kv.view(num_kv_heads, 1, -1).expand(num_kv_heads, heads_per_kv, -1)
    return s.reshape(-1)


def _factors(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_max.clamp(min=FLOOR).pow(alpha) / w_max.clamp(min=FLOOR).pow(1 - alpha)  # [in]
    return s / (s.max() * s.min()).sqrt()  # centred on 1: a common factor changes nothing but the range


def smooth_layer(
    w: Weights, x_max: dict[str, torch.Tensor], alpha: float, num_kv_heads: int, heads_per_kv: int,
    sites: tuple[Site, ...] = SITES,
) -> dict[str, torch.Tensor]:
    """Compute and fold every site's factors into the layer's weights `w` (in place); returns s per tap
    (the linears' inputs are now x / s). x_max: max |x| per input channel of each tap, original weights."""
    out = {}
    for site in sites:
        readers = [w[f"{n}.weight"] for n in site.linears]
        if site.tap == "o":
            s_prev = gqa_smoothing_factors(x_max["o"], readers[0], alpha, num_kv_heads, heads_per_kv)
            s = expand_gqa(s_prev, num_kv_heads, heads_per_kv)
        else:
            s = s_prev = smoothing_factors(x_max[site.tap], readers, alpha)
        fold(w, site, s, s_prev)
        out[site.tap] = s
    return out
