"""fp8's calibrated recipe as a weight transform: optional activation smoothing, then GPTQ rounding.

Why: round-to-nearest W8A8 e4m3 costs SmolLM2-135M about 4% perplexity, half from the weights and half
from the per-token activation rounding (BENCHMARKS.md). The recipe keeps the format and the runtime as
they are and changes only the numbers written:
  - smoothing (quant/smooth.py, `alpha` > 0) folds per-channel factors into the norms and linears;
  - GPTQ (quant/gptq.py, `gptq`) rounds each linear's weights for its calibration inputs, so that the
    layer's output error is what is minimized, not each weight's own.
Both run layer by layer on the calibration text (quant/layerwise.py). The transform yields float32
weights; with GPTQ each linear's weights already lie on their rows' e4m3 grid with the row maximum at
+-448 * scale, so the round-to-nearest quantize_fp8 that write_checkpoint applies gives back exactly the
GPTQ values (tests/quant/test_fp8_recipe.py checks it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.config import ModelConfig
from kiln.errors import KilnError
from kiln.quant.gptq import gptq_fp8
from kiln.quant.layerwise import SITES, Rope, Weights, layer_forward, open_model, transform_layers
from kiln.quant.smooth import smooth_layer


@dataclass
class _Stats:
    """One site's input over the calibration tokens."""

    x_max: torch.Tensor | None = None  # [in] max |x| per channel
    hessian: torch.Tensor | None = None  # [in, in] sum of x^T x, float64 (each window's product in float32)

    def add(self, x: torch.Tensor, hessian: bool) -> None:
        top = x.abs().amax(0)
        self.x_max = top if self.x_max is None else torch.maximum(self.x_max, top)
        if hessian:
            h = (x.T @ x).double()
            self.hessian = h if self.hessian is None else self.hessian + h


def check_smoothquant(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0 <= alpha <= 1):
        raise KilnError(f"--smoothquant {alpha} is out of range: the smoothing strength alpha must be between "
                        "0 and 1 (0 turns smoothing off; 0.5 moves half of the activations' range to the weights)")


def fp8_transform(
    model_dir: Path, cfg: ModelConfig, calib: list[torch.Tensor], alpha: float, gptq: bool,
    device: str = "cpu", progress: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor of the HF model (HF names, float32) with fp8's recipe applied: smoothing
    factors of strength `alpha` (0: none) folded in, and with `gptq` each linear's weights rounded by GPTQ
    to e4m3 (per-row scales) and given back dequantized. Arguments are checked before the first tensor
    is asked for (KilnError on a user mistake)."""
    check_smoothquant(alpha)
    index = open_model(model_dir, cfg, calib, device)
    heads_per_kv = cfg.num_heads // cfg.num_kv_heads

    def layer(i: int, w: Weights, hidden: list[torch.Tensor], rope: Rope) -> None:
        inputs = list(hidden)
        stats = _calibrate(cfg, i, w, hidden, rope, hessian=gptq and not alpha)
        if alpha:
            smooth_layer(w, {t: st.x_max for t, st in stats.items()}, alpha, cfg.num_kv_heads, heads_per_kv)
            if gptq:  # the inputs the smoothed linears see: x / s
                stats = _calibrate(cfg, i, w, inputs, rope, hessian=True)
        if gptq:
            _round_layer(w, stats)

    return transform_layers(index, cfg, calib, device, progress, "fp8", layer)


def _calibrate(
    cfg: ModelConfig, i: int, w: Weights, hidden: list[torch.Tensor], rope: Rope, hessian: bool
) -> dict[str, _Stats]:
    """Run layer i on every window, gathering each site's input statistics; replaces `hidden` (in place)
    with the layer's outputs. As in AWQ, the next layer sees the float layer's outputs."""
    stats = {site.tap: _Stats() for site in SITES}
    for j, x in enumerate(hidden):
        hidden[j] = layer_forward(cfg, i, w, x, rope, lambda name, t: stats[name].add(t, hessian))
    return stats


def _round_layer(w: Weights, stats: dict[str, _Stats]) -> None:
    """GPTQ-round every linear of the layer (the linears of one site together: one input, one Hessian)."""
    for site in SITES:
        names = [f"{n}.weight" for n in site.linears]
        q = gptq_fp8(torch.cat([w[n] for n in names]), stats[site.tap].hessian)  # type: ignore[arg-type]
        deq = (q["weight"].float() * q["weight_scale"][:, None]).split([w[n].shape[0] for n in names])
        w.update(zip(names, deq))
