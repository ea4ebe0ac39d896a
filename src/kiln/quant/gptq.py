"""GPTQ rounding (Frantar et al. 2022, arXiv 2210.17323) for e4m3 weights with per-row scales.

Why: rounding each weight to its nearest e4m3 value ignores that the errors of one output row add up
over its input columns. GPTQ rounds one column at a time and spreads that column's rounding error over
the columns not rounded yet, weighted by the inverse Hessian H = sum x^T x of the layer's calibration
inputs, so that what is minimized is the layer's output error on those inputs, not the weights' error.

The format is unchanged: e4m3 values with one float32 scale per output row (formats.quantize_fp8).
"""

from __future__ import annotations

import torch

from kiln.quant.formats import FP8_MAX

BLOCK = 128  # columns rounded before their accumulated error is pushed to the rest (GPTQ's lazy batch)
DAMP = 0.01  # fraction of the mean diagonal added to H, so its Cholesky factor exists and is well-behaved


def gptq_fp8(
    w: torch.Tensor, hessian: torch.Tensor, block: int = BLOCK, damp: float = DAMP
) -> dict[str, torch.Tensor]:
    """Round w [out, in] to e4m3 with per-row scales, minimizing the output error on the inputs x whose
    H = sum x^T x [in, in] is `hessian` (float64 is best).

    Returns {"weight": float8_e4m3fn [out, in], "weight_scale": float32 [out]}, as formats.quantize_fp8.
    Each row's largest weight (before any update) is rounded to +-448 whatever the earlier columns'
    errors moved it to (its own error is then spread like any other), so every row's maximum stays
    448 * scale and quantize_fp8 of the dequantized result finds the same scale and values: the rounded
    weights can travel as float through the round-to-nearest checkpoint writer.
    """
    h = hessian.double().clone()
    target = w.double().clone()
    dead = torch.diag(h) == 0  # channels that never saw a nonzero input: any weight is as good
    h[dead, dead] = 1
    target[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # [in, in]
    scale = (target.abs().amax(1, keepdim=True).clamp(min=1e-12) / FP8_MAX).float().double()  # [out, 1], as stored
    pin_col = target.abs().argmax(1)  # [out]: each row's largest weight is rounded to +-FP8_MAX
    pin_q = FP8_MAX * target.gather(1, pin_col[:, None])[:, 0].sign().float()  # [out]
    q = torch.empty_like(target, dtype=torch.float8_e4m3fn)
    for b0 in range(0, target.shape[1], block):
        b1 = min(b0 + block, target.shape[1])
        part = target[:, b0:b1]  # [out, b] view: updated in place as columns are rounded
        err = torch.empty_like(part)
        for i in range(b1 - b0):
            col = part[:, i]  # [out]
            qc = (col / scale[:, 0]).clamp(-FP8_MAX, FP8_MAX).float()
            qc = torch.where(pin_col == b0 + i, pin_q, qc).to(torch.float8_e4m3fn)
            q[:, b0 + i] = qc
            e = (col - qc.double() * scale[:, 0]) / u[b0 + i, b0 + i]
            part[:, i:] -= e[:, None] * u[b0 + i, b0 + i : b1][None, :]
            err[:, i] = e
        target[:, b1:] -= err @ u[b0:b1, b1:]
    return {"weight": q, "weight_scale": scale[:, 0].float()}
