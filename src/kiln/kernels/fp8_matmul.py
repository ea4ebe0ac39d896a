"""fp8 W8A8 linear: x quantized per token to e4m3 at run time, times an e4m3 weight with per-row scales.

Shapes and dtypes (kiln.quant.formats, reference.linear_fp8):
    x             [..., K] fp16 / bf16 / fp32 (M = product of the leading dims), any strides
    weight        float8_e4m3fn [N, K]; weight_scale float32 [N]
    xq, sx        quantize_fp8_per_token(x): e4m3 [M, K] contiguous and float32 [M, 1],
                  sx = max(amax|x[m]|, 1e-12) / 448, xq = e4m3(x / sx) rounded to nearest even
    y             [..., N] = (xq @ weight^T) * sx[m] * weight_scale[n], in x's dtype (or out_dtype)

fp8_matmul: quantize (Triton), then torch._scaled_mm with row-wise scales: scale_a = sx [M, 1] and
scale_b = weight_scale as [1, N], both contiguous float32; mat2 = weight.t(), the column-major [K, N]
view of the row-major weight. _scaled_mm requires compute capability >= 8.9 and K % 16 == 0 and
N % 16 == 0 (M is free: no padding needed); other shapes, CPU tensors and M <= gemv_max_m take
fp8_gemv. Older PyTorch accepted only bf16 output for row-wise scaling; for another x dtype fp8_matmul
then asks for bf16 and casts (remembered per dtype).

fp8_gemv (decode candidate, to be measured against _scaled_mm): the same quantization, then a Triton
GEMV that reads the e4m3 weight once, converts it to fp32 in registers and accumulates xq * wq in fp32;
both scales multiply the reduced dot. The structure (tiles of BLOCK_N rows, all M rows of x per program,
split-K reduced in place by the last split to arrive) is int4_matmul's.

Rounding. quantize_fp8_per_token reproduces formats.fake_quantize_fp8_per_token bit for bit: IEEE
division (tl.math.div_rn; Triton's `/` is approximate on the GPU) and round-to-nearest-even onto the
e4m3 grid done in fp32 integer arithmetic (round_to_e4m3), so the final cast to e4m3 is exact. That
rounding by hand is also what makes the kernel correct in Triton's interpreter, whose fp32 -> fp8 cast
does not round to nearest (it gets ~3% of values wrong by a binade); exactly representable values it
casts right.

Roofline (H100 SXM, 3.35 TB/s; ~1979 dense fp8 TFLOP/s):
- quantize_fp8_per_token: memory bound, reads x twice (the second pass mostly from L1/L2) and writes
  1 byte per element + 4 per row: Mistral-7B's 2048 x 4096 bf16 x is 16 MB read, 8 MB written: ~7 us.
  One program per row; rows of x are short (K <= 14336), so one row's second pass hits in cache.
- fp8_gemv (M <= 8): memory bound, N * K bytes of weight read once: 4096x4096 17 MB -> 5 us at full
  bandwidth; 3.35e12 weights/s is 13 per SM clock, inside the conversion (cvt e4m3x2 -> f16x2) and
  FMA budget for a few rows of x (sm_90 SASS, Triton 3.9, not run: ~4.7 instructions per weight in
  the main loop at M = 1).
- _scaled_mm (prefill): tensor-core bound, 2 M N K FLOPs at up to twice the bf16 rate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels import split_counters
from kiln.kernels.int4_matmul import output_rows, split_plan
from kiln.kernels.pdl import grid_dependency_sync, launch_dependents, pdl_args, warm_rows


@triton.jit
def round_to_e4m3(v):
    """fp32 with |v| <= 448 (up to rounding) -> the nearest e4m3 value (ties to even), as fp32."""
    # Normal e4m3 keeps 3 of fp32's 23 mantissa bits: add half an e4m3 ulp (minus one, plus the kept
    # lsb: ties to even) and clear the 20 dropped bits; a carry bumps the exponent, as it should.
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + (0x7FFFF + ((bits >> 20) & 1))) & -1048576  # -1048576 == ~0xFFFFF
    normal = bits.to(tl.float32, bitcast=True)
    # Below 2**-6 e4m3 is subnormal, a fixed step of 2**-9: round v * 2**9 to an integer by adding and
    # subtracting 1.5 * 2**23 (fp32 add rounds to nearest even).
    sub = ((v * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
    r = tl.where(tl.abs(v) < 0.015625, sub, normal)
    return tl.minimum(tl.maximum(r, -448.0), 448.0)


@triton.jit
def _quantize_fp8_kernel(x_ptr, xq_ptr, s_ptr, K, stride_xm, stride_xk, stride_qm, BLOCK_K: tl.constexpr,
                         ONE_PASS: tl.constexpr, USE_PDL: tl.constexpr):
    grid_dependency_sync(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    if ONE_PASS:  # the whole row in registers: one read, one dependent chain (decode's short rows)
        offs = tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_row + offs * stride_xk, mask=mask, other=0.0).to(tl.float32)
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), 448.0)
        tl.store(s_ptr + row, scale)
        xq = round_to_e4m3(tl.math.div_rn(x, scale))
        tl.store(xq_ptr + row * stride_qm + offs, xq.to(xq_ptr.dtype.element_ty), mask=mask)
        return
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-12), 448.0)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_row + offs * stride_xk, mask=mask, other=0.0).to(tl.float32)
        xq = round_to_e4m3(tl.math.div_rn(x, scale))
        tl.store(xq_ptr + row * stride_qm + offs, xq.to(xq_ptr.dtype.element_ty), mask=mask)


def attach(x: torch.Tensor, xq: torch.Tensor, scale: torch.Tensor) -> None:
    """Remember that x's per-token quantization is (xq, scale), computed where x was made (the fused
    RMSNorm): fp8_matmul and fp8_gemv given this very tensor use them instead of quantizing again. The
    maker writes x and attaches in one call; whoever writes x again detaches (detach)."""
    x._kiln_fp8 = (xq, scale)


def detach(x: torch.Tensor) -> None:
    """Forget an attached quantization (x is about to be overwritten)."""
    if hasattr(x, "_kiln_fp8"):
        del x._kiln_fp8


def quantized(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x's per-token quantization: the one attached to x, or computed now. x [..., K]."""
    pre = getattr(x, "_kiln_fp8", None)
    if pre is not None:
        return pre
    return quantize_fp8_per_token(x.reshape(-1, x.shape[-1]))


def quantize_fp8_per_token(
    x: torch.Tensor, *, block_k: int = 1024, num_warps: int = 4, one_pass_max_m: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float dtype, any strides) -> (xq float8_e4m3fn [M, K] contiguous, scale fp32 [M, 1]),
    with x ~= xq * scale; bit-equal to formats.fake_quantize_fp8_per_token's quantization.

    Up to one_pass_max_m rows (decode) and K <= 16384, each program holds its whole row in registers and
    reads it once; otherwise two passes of block_k columns (the second from cache)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got shape {tuple(x.shape)}")
    m, k = x.shape
    xq = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m == 0:
        return xq, scale
    one_pass = m <= one_pass_max_m and k <= 16384
    if one_pass:
        block_k = triton.next_power_of_2(max(k, 1))
        num_warps = max(num_warps, min(16, block_k // 512))  # ~16 values per thread
    else:
        block_k = min(block_k, triton.next_power_of_2(max(k, 1)))
    _quantize_fp8_kernel[(m,)](
        x, xq, scale, k, x.stride(0), x.stride(1), xq.stride(0), BLOCK_K=block_k, ONE_PASS=one_pass,
        num_warps=num_warps, **pdl_args(x.device),
    )
    return xq, scale


@triton.jit
def _fp8_gemv_kernel(
    xq_ptr, sx_ptr, w_ptr, sw_ptr, out_ptr, part_ptr, count_ptr,
    M, N, K, split_cols,
    stride_xm, stride_wn, stride_wk, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FUSED_SPLITS: tl.constexpr,
    WARM: tl.constexpr, USE_PDL: tl.constexpr,
):
    # Program (n tile, K split, M block). xq is contiguous [M, K] (quantize_fp8_per_token's output).
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    m0 = tl.program_id(2) * BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_start = pid_s * split_cols
    k_end = tl.minimum(k_start + split_cols, K)
    if USE_PDL:  # while the kernel before ends, this program's weight lines into L2 (128 values a line)
        warm_rows(w_ptr + offs_n * stride_wn, k_start, k_end, n_mask, stride_wk, 128, WARM)
    grid_dependency_sync(USE_PDL)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # transposed: rows of W along dim 0

    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        for m in tl.static_range(BLOCK_M):
            row = tl.minimum(m0 + m, M - 1)  # rows past M are computed, never stored
            xv = tl.load(xq_ptr + row * stride_xm + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            part = tl.sum(w * xv[None, :], axis=1)
            acc = tl.where(offs_m[None, :] == m0 + m, acc + part[:, None], acc)

    launch_dependents(USE_PDL)  # main loop done: the next kernel may start (KILN_PDL=late)
    sw = tl.load(sw_ptr + offs_n, mask=n_mask, other=0.0)
    sx = tl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)
    acc = acc * sw[:, None] * sx[None, :]
    mask = n_mask[:, None] & (offs_m[None, :] < M)
    out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
    if FUSED_SPLITS:  # the last split of each output element sums the partials (int4_matmul's gemv1)
        elem = offs_m[None, :] * N + offs_n[:, None]
        tl.store(part_ptr + pid_s * M * N + elem, acc, mask=mask)
        tl.debug_barrier()
        seen = tl.atomic_add(count_ptr + elem, 1, mask=mask, sem="acq_rel")
        last = mask & (seen == tl.num_programs(1) - 1)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for s in range(tl.num_programs(1)):
            acc += tl.load(part_ptr + s * M * N + elem, mask=last, other=0.0)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=last)
        tl.store(count_ptr + elem, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32), mask=last)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8 weight must be float8_e4m3fn [N, K], got {weight.dtype}")
    if weight_scale.numel() != n or weight_scale.dtype != torch.float32:
        raise ValueError(
            f"weight_scale must be float32 [{n}], got {weight_scale.dtype} {tuple(weight_scale.shape)}"
        )
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {k}")
    return x.reshape(-1, k)


def _gemv_quantized(
    xq: torch.Tensor, sx: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, out2: torch.Tensor,
    *,
    block_m: int | None, block_n: int, block_k: int, split_k: int | None, num_warps: int, warm: int = 1,
) -> None:
    m, k = xq.shape
    n = weight.shape[0]
    block_m = block_m or min(8, triton.next_power_of_2(m))
    grid_n, grid_m = triton.cdiv(n, block_n), triton.cdiv(m, block_m)
    split_cols, n_splits = split_plan(k, block_k, split_k, grid_n * grid_m, xq.device)
    fused = n_splits > 1
    part = torch.empty(n_splits, m, n, dtype=torch.float32, device=xq.device) if fused else out2
    counters = split_counters(xq.device, m * n) if fused else out2
    _fp8_gemv_kernel[(grid_n, n_splits, grid_m)](
        xq, sx, weight, weight_scale.reshape(n), out2, part, counters,
        m, n, k, split_cols,
        xq.stride(0), weight.stride(0), weight.stride(1), out2.stride(0), out2.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, FUSED_SPLITS=fused, WARM=int(warm),
        num_warps=num_warps, **pdl_args(xq.device, late=True),
    )


def fp8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int = 64,
    block_k: int = 128,
    split_k: int | None = None,
    num_warps: int = 4,
    warm: int = 1,
) -> torch.Tensor:
    """W8A8 y = x @ W^T for small M: quantize x per token, then one pass over the e4m3 weight.

    block_m: rows of x per program (default next_power_of_2(M), at most 8). split_k: programs per output
    tile along K (None: int4_matmul.auto_split_k), reduced in place by the last split of each element.
    warm: where the launch overlaps the kernel before (kernels/pdl.py), each program first asks for its
    share of the weight into L2 (1), only the first two 128-byte lines of each of its rows (2), or
    nothing (0).
    """
    x2 = _check(x, weight, weight_scale)
    m, n = x2.shape[0], weight.shape[0]
    result, out2 = output_rows(x, m, n, out)
    if m == 0 or n == 0:
        return result
    xq, sx = quantized(x)
    _gemv_quantized(xq, sx, weight, weight_scale, out2, block_m=block_m, block_n=block_n, block_k=block_k,
                    split_k=split_k, num_warps=num_warps, warm=warm)
    return result


_ROWWISE_OUT_OK: dict[torch.dtype, bool] = {}  # out dtypes _scaled_mm's row-wise scaling accepts here


def _scaled_mm(
    xq: torch.Tensor, sx: torch.Tensor, weight: torch.Tensor, sw: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    if _ROWWISE_OUT_OK.get(dtype, True):
        try:
            y = torch._scaled_mm(xq, weight.t(), scale_a=sx, scale_b=sw, out_dtype=dtype)
            _ROWWISE_OUT_OK[dtype] = True
            return y
        except (RuntimeError, ValueError):
            # Shape and dtype checks raise before anything is launched, so this is safe in a capture.
            if dtype == torch.bfloat16:
                raise
            _ROWWISE_OUT_OK[dtype] = False
    return torch._scaled_mm(xq, weight.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16).to(dtype)


def fp8_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    *,
    gemv_max_m: int = 0,
    gemv: dict[str, int] | None = None,
) -> torch.Tensor:
    """W8A8 y = x @ W^T in out_dtype (default x's dtype): quantize_fp8_per_token, then torch._scaled_mm.

    fp8_gemv instead for CPU tensors (Triton interpreter), shapes _scaled_mm refuses (K or N not a
    multiple of 16) and M <= gemv_max_m (0: never; kiln build measures where fp8_gemv is faster for
    decode, kernels/tuning.py). gemv: fp8_gemv's block sizes.
    """
    x2 = _check(x, weight, weight_scale)
    out_dtype = out_dtype or x.dtype
    m, n = x2.shape[0], weight.shape[0]
    k = x2.shape[1]
    if m == 0 or n == 0:
        return torch.empty(*x.shape[:-1], n, dtype=out_dtype, device=x.device)
    xq, sx = quantized(x)
    if not x.is_cuda or k % 16 or n % 16 or m <= gemv_max_m:
        y = torch.empty(m, n, dtype=out_dtype, device=x.device)
        cfg = {"block_m": None, "block_n": 64, "block_k": 128, "split_k": None, "num_warps": 4, **(gemv or {})}
        _gemv_quantized(xq, sx, weight, weight_scale, y, **cfg)
    else:
        w = weight if weight.stride(1) == 1 else weight.contiguous()  # mat2 must be column-major
        y = _scaled_mm(xq, sx, w, weight_scale.reshape(1, n).contiguous(), out_dtype)
    return y.view(*x.shape[:-1], n)
