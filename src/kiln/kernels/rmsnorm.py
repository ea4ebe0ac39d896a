"""RMSNorm with the residual add fused in: s = x + residual; y = weight * norm(s).

Shapes: x, residual, out: [num_tokens, hidden], each with its own row stride and unit column stride;
weight: [hidden]. x and residual share a dtype (fp32, fp16 or bf16); y has the dtype `weight * x` has
in PyTorch (x's dtype when weight is stored in the model dtype, as it is after loading).

Semantics are those of reference.rms_norm, rounding included: s is rounded to x's dtype (it is the next
layer's residual), the mean of squares and the scaling are float32, the normalized row is rounded to x's
dtype before the weight multiplies it. With a residual, s is written back IN PLACE into `residual`
(saving an allocation and a separate write); without one, s is x itself and nothing is written.

One program per row; the whole row is one power-of-two block held in registers (hidden up to 65536,
padding masked), so every byte is read once: no second pass over the row to apply the scale.

Roofline: memory bound (~4 FLOPs per element). Bytes per row with residual: read x + residual, write s
+ y = 4 * hidden * elsize (+ weight, which stays in L2). Mistral-7B (hidden 4096, bf16) at 2048 tokens
moves 64 MiB: ~20 us at H100 bandwidth. Without a residual: 2 * hidden * elsize.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.fp8_matmul import attach, detach, round_to_e4m3
from kiln.kernels.pdl import grid_dependency_sync, pdl_args

MAX_HIDDEN = 65536  # one row must fit one block of registers


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, xq_ptr, sx_ptr,
    stride_x, stride_res, stride_out,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr,
    QUANT_FP8: tl.constexpr,
    BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    grid_dependency_sync(USE_PDL)
    row = tl.program_id(0).to(tl.int64)  # row * stride can pass 2**31 at long prefills
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols

    s = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # The sum is rounded to x's dtype exactly as PyTorch rounds `x + residual`.
        s = (s.to(tl.float32) + r.to(tl.float32)).to(s.dtype)
        tl.store(res_ptr + row * stride_res + cols, s, mask=mask)

    h = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    normed = (h * rstd).to(s.dtype).to(tl.float32)  # rounded like the reference's `.to(x.dtype)`
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (w * normed).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, y, mask=mask)
    if QUANT_FP8:  # the row as the next fp8 layer quantizes it (fp8_matmul.quantize_fp8_per_token)
        yf = y.to(tl.float32)
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(yf), axis=0), 1e-12), 448.0)
        tl.store(sx_ptr + row, scale)
        xq = round_to_e4m3(tl.math.div_rn(yf, scale))
        tl.store(xq_ptr + row * n_cols + cols, xq.to(xq_ptr.dtype.element_ty), mask=mask)


def _num_warps(block: int) -> int:
    # Enough threads that each holds a few 16-byte vectors of the row, no more.
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    quantize_fp8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (weight * rmsnorm(x + residual), x + residual); see the module docstring.

    x, residual: [num_tokens, hidden] (unit column stride); with a residual, x + residual is written into
    `residual` and `residual` is returned. out: optional preallocated [num_tokens, hidden].
    quantize_fp8: also quantize each output row per token to e4m3, in the same kernel, exactly as
    fp8_matmul.quantize_fp8_per_token would, and attach the result to the output (fp8_matmul.attach), so
    the fp8 layer that reads it skips its own quantization kernel.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [num_tokens, hidden], got shape {tuple(x.shape)}")
    n_rows, hidden = x.shape
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden {hidden} > {MAX_HIDDEN} is not supported by the one-block kernel")
    if weight.shape != (hidden,) or weight.stride(0) != 1:
        raise ValueError(f"weight must be a contiguous [{hidden}], got shape {tuple(weight.shape)}")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError("residual must have x's shape and dtype")
    if out is None:
        out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    elif out.shape != x.shape:
        raise ValueError(f"out must have shape {tuple(x.shape)}, got {tuple(out.shape)}")
    for name, t in (("x", x), ("residual", residual), ("out", out)):
        if t is not None and hidden > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} must have a unit column stride")

    if quantize_fp8:
        xq = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        sx = torch.empty(n_rows, 1, dtype=torch.float32, device=x.device)
    else:
        xq = sx = out  # valid pointers; never written
    if n_rows > 0:
        block = triton.next_power_of_2(hidden)
        res = residual if residual is not None else x  # a valid pointer; never read or written
        _rms_norm_kernel[(n_rows,)](
            x, res, weight, out, xq, sx,
            x.stride(0), res.stride(0), out.stride(0),
            hidden, eps,
            HAS_RESIDUAL=residual is not None,
            QUANT_FP8=quantize_fp8,
            BLOCK=block,
            num_warps=_num_warps(block), **pdl_args(x.device),
        )
    if quantize_fp8:
        attach(out, xq, sx)
    else:
        detach(out)  # a preallocated out may carry an older row's quantization
    return out, (residual if residual is not None else x)
