"""Weight-only int8 linear (int8_wo): y = x @ W^T with W dequantized in registers.

Shapes and dtypes (kiln.quant.formats; y[m, n] = sum_k x[m, k] * w[n, k]):
    x        [..., K] fp16 or bf16 (any leading dims; M = their product), any strides
    qweight  int8 [N, K], symmetric (-127..127); w[n, k] = q[n, k] * scales[n, k // G]
    scales   [N, K // G] (any float dtype); G = group_size: 32, 64, 128, ... or 0 / K (per channel)
    y        [..., N] in x's dtype (or written into `out`, any strides)
All tensors may have any strides (a unit stride along K is what makes the loads vectorize).

The structure is int4_matmul's, one byte per weight instead of half of one; see that module for the
shared helpers (split-K reduction, group chunking) and the reasoning in full.

Roofline (H100 SXM, 3.35 TB/s):
- Decode, int8_gemv (M <= 8): memory bound, N * K bytes of weight read exactly once (+ 2 bytes of
  scale per group of a row). Mistral-7B: 6144x4096 25 MB, 4096x4096 17 MB, 28672x4096 117 MB,
  4096x14336 59 MB: 7.5 / 5.0 / 35 / 17.5 us at full bandwidth. 3.35e12 weights/s is 13 per SM clock,
  so the ALU budget (~10 fp32 ops per weight) is looser than int4's; the int -> float still goes through
  the exponent trick (int4_matmul) rather than I2F (16/clk/SM), and the scale multiplies the reduced
  chunk, once per (row, group, x row). Compiled for sm_90 (Triton 3.9, not run), the main loop issues
  ~6 instructions per weight at M = 1 (room for full bandwidth) and ~12 at M = 4 (~80% of it).
  Split-K as in int4_gemv when N / BLOCK_N programs are too few.
- Prefill, int8_gemm: tensor cores on x and the tile dequantized in registers to x's dtype
  ((q * s) in fp32, rounded once: exactly the reference's weight); the unpacking is amortized over
  BLOCK_M rows. dequantize_int8 (1 byte in, 2 out per weight) + cuBLAS is the alternative at large M.
  K is split as in the GEMV when the output tiles are too few (so BLOCK_M = 16 also serves a few rows).

Every block size, split and warp count is a keyword argument with a default to be tuned on the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.int4_matmul import (
    EXP23,
    EXP23_BITS,
    as_rows,
    chunk_in_group,
    group_constexpr,
    group_of,
    load_group_param,
    output_rows,
    split_plan,
    splits_target,
    sum_splits,
)
from kiln.kernels.pdl import grid_dependency_sync, launch_dependents, pdl_args


@triton.jit
def _int8_to_f32(q):
    """int8 -> fp32 exactly without an I2F: 2**23 + 128 + q has q + 128 (0..255) in its mantissa."""
    return (q.to(tl.int32) + (EXP23_BITS + 128)).to(tl.float32, bitcast=True) - (EXP23 + 128.0)


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int):
    """-> (x as [M, K], N, K, group size in columns)."""
    n, k = qweight.shape
    if qweight.dtype != torch.int8:
        raise ValueError(f"int8 qweight must be int8 [N, K], got {qweight.dtype}")
    if scales.shape[0] != n:
        raise ValueError(f"scales {tuple(scales.shape)} do not fit qweight {tuple(qweight.shape)}")
    return as_rows(x, k), n, k, group_of(k, scales.shape[1], group_size)


@triton.jit
def _int8_gemv_kernel(
    x_ptr, q_ptr, s_ptr, out_ptr,
    M, N, K, split_cols,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_os, stride_om, stride_on,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr, USE_PDL: tl.constexpr,
):
    grid_dependency_sync(USE_PDL)
    # Program (n tile, K split, M block); each CHUNK of K lies inside one group.
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    m0 = tl.program_id(2) * BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = m0 + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # transposed: rows of W along dim 0

    k_start = pid_s * split_cols
    k_end = tl.minimum(k_start + split_cols, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        for c in tl.static_range(0, BLOCK_K, CHUNK):
            offs_k = k0 + c + tl.arange(0, CHUNK)
            k_mask = offs_k < K
            q = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :] * stride_qk,
                        mask=n_mask[:, None] & k_mask[None, :], other=0)
            w = _int8_to_f32(q)
            g = tl.minimum(k0 + c, K - 1) // GROUP  # a piece past K (all masked) reads the last group
            s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0).to(tl.float32)
            for m in tl.static_range(BLOCK_M):
                row = tl.minimum(m0 + m, M - 1)  # rows past M are computed, never stored
                xv = tl.load(x_ptr + row * stride_xm + offs_k * stride_xk, mask=k_mask, other=0.0)
                part = tl.sum(w * xv.to(tl.float32)[None, :], axis=1)
                acc = tl.where(offs_m[None, :] == m0 + m, acc + (part * s)[:, None], acc)

    launch_dependents(USE_PDL)  # main loop done: the next kernel may start (KILN_PDL=late)
    out_ptrs = out_ptr + pid_s * stride_os + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & (offs_m[None, :] < M))


def int8_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    out: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int = 64,
    block_k: int = 128,
    split_k: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """Decode-shaped y = x @ W^T (M small): reads the int8 weight once per block of `block_m` rows.

    block_m: rows of x per program (default next_power_of_2(M), at most 8). block_k: K columns per
    loop step. split_k: programs per output tile along K (None: int4_matmul.auto_split_k).
    """
    x2, n, k, group = _check(x, qweight, scales, group_size)
    m = x2.shape[0]
    result, out2 = output_rows(x, m, n, out)
    if m == 0 or n == 0:
        return result
    block_m = block_m or min(8, triton.next_power_of_2(m))
    n_groups = scales.shape[1]
    grid_n, grid_m = triton.cdiv(n, block_n), triton.cdiv(m, block_m)
    split_cols, n_splits = split_plan(k, block_k, split_k, grid_n * grid_m, x.device)
    target, stride_os = splits_target(out2, n_splits)
    _int8_gemv_kernel[(grid_n, n_splits, grid_m)](
        x2, qweight, scales, target,
        m, n, k, split_cols,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        stride_os, target.stride(-2), target.stride(-1),
        GROUP=group_constexpr(group, n_groups), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        CHUNK=chunk_in_group(block_k, group, n_groups), num_warps=num_warps, **pdl_args(x.device, late=True),
    )
    if n_splits > 1:
        sum_splits(target, out2)
    return result


@triton.jit
def _int8_gemm_kernel(
    x_ptr, q_ptr, s_ptr, out_ptr,
    M, N, K, split_cols,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_os, stride_om, stride_on,
    GROUP: tl.constexpr, SCALAR_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    grid_dependency_sync(USE_PDL)
    # Program (output tile, K split). Tiles are walked GROUP_M tile-rows at a time, so neighbours share
    # x and W tiles in L2.
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_s * split_cols
    k_end = tl.minimum(k_start + split_cols, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xt = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        q = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :] * stride_qk,
                    mask=n_mask[:, None] & k_mask[None, :], other=0)
        s = load_group_param(s_ptr, offs_n, n_mask, k0, offs_k, k_mask, stride_sn, stride_sg, GROUP,
                             SCALAR_GROUP)
        w = (_int8_to_f32(q) * s).to(xt.dtype)
        acc = tl.dot(xt, tl.trans(w), acc)

    out_ptrs = (out_ptr + pid_s * stride_os + offs_m.to(tl.int64)[:, None] * stride_om
                + offs_n[None, :] * stride_on)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def int8_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    out: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int = 128,
    block_k: int = 64,
    group_m: int = 8,
    split_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Prefill-shaped y = x @ W^T on tensor cores, the int8 tile dequantized in registers.

    block_m: default next_power_of_2(M) clamped to [16, 64]. When a K step spans several groups
    (block_k > G) the scales are gathered per element instead of per row. split_k: programs per output
    tile along K (None: int4_matmul.auto_split_k, 1 once the tiles fill the GPU).
    """
    x2, n, k, group = _check(x, qweight, scales, group_size)
    m = x2.shape[0]
    result, out2 = output_rows(x, m, n, out)
    if m == 0 or n == 0:
        return result
    block_m = block_m or min(64, max(16, triton.next_power_of_2(m)))
    if min(block_m, block_n, block_k) < 16:
        raise ValueError("tl.dot needs block_m, block_n and block_k >= 16")
    n_groups = scales.shape[1]
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_cols, n_splits = split_plan(k, block_k, split_k, tiles, x.device)
    target, stride_os = splits_target(out2, n_splits)
    _int8_gemm_kernel[(tiles, n_splits)](
        x2, qweight, scales, target,
        m, n, k, split_cols,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        stride_os, target.stride(-2), target.stride(-1),
        GROUP=group_constexpr(group, n_groups), SCALAR_GROUP=n_groups == 1 or group % block_k == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        num_warps=num_warps, num_stages=num_stages, **pdl_args(x.device),
    )
    if n_splits > 1:
        sum_splits(target, out2)
    return result


@triton.jit
def _dequant_int8_kernel(
    q_ptr, s_ptr, out_ptr,
    N, K,
    stride_qn, stride_qk, stride_sn, stride_sg, stride_on,
    GROUP: tl.constexpr, SCALAR_GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    grid_dependency_sync(USE_PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    mask = n_mask[:, None] & k_mask[None, :]
    q = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :] * stride_qk, mask=mask, other=0)
    s = load_group_param(s_ptr, offs_n, n_mask, k0, offs_k, k_mask, stride_sn, stride_sg, GROUP, SCALAR_GROUP)
    w = _int8_to_f32(q) * s
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :],
             w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_int8(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    dtype: torch.dtype,
    *,
    block_n: int = 32,
    block_k: int = 256,
    num_warps: int = 4,
) -> torch.Tensor:
    """The full weight [N, K] in `dtype`, equal to quant.formats.dequantize_int."""
    n, k = qweight.shape
    group = group_of(k, scales.shape[1], group_size)
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    if out.numel() == 0:
        return out
    n_groups = scales.shape[1]
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequant_int8_kernel[grid](
        qweight, scales, out,
        n, k,
        qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1), out.stride(0),
        GROUP=group_constexpr(group, n_groups), SCALAR_GROUP=n_groups == 1 or group % block_k == 0,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, **pdl_args(qweight.device),
    )
    return out


def int8_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    out: torch.Tensor | None = None,
    *,
    gemv_max_m: int = 4,
    dequant_min_m: int | None = None,
    gemv: dict[str, int] | None = None,
    gemm: dict[str, int] | None = None,
) -> torch.Tensor:
    """y = x @ W^T for the int8 format, the path picked by M (rows of x):
    M <= gemv_max_m: int8_gemv; M >= dequant_min_m (None: never): dequantize_int8, then cuBLAS;
    otherwise int8_gemm. gemv / gemm: keyword arguments (block sizes) of those paths. The defaults are
    replaced by the plan kiln build measures for each layer shape (kernels/tuning.py)."""
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if m <= gemv_max_m:
        return int8_gemv(x, qweight, scales, group_size, out, **(gemv or {}))
    if dequant_min_m is not None and m >= dequant_min_m:
        x2, n, _, _ = _check(x, qweight, scales, group_size)
        result, out2 = output_rows(x, m, n, out)
        torch.mm(x2, dequantize_int8(qweight, scales, group_size, x.dtype).t(), out=out2)
        return result
    return int8_gemm(x, qweight, scales, group_size, out, **(gemm or {}))
