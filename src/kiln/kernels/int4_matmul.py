"""Weight-only int4 linear (int4_wo, int4_awq): y = x @ W^T with W dequantized in registers.

Shapes and dtypes (kiln.quant.formats; y[m, n] = sum_k x[m, k] * w[n, k]):
    x        [..., K] fp16 or bf16 (any leading dims; M = their product)
    qweight  uint8 [N, K // 2]: column 2j in the low nibble of byte j, column 2j + 1 in the high one
    scales   [N, K // G] (any float dtype), zeros uint8 [N, K // G] (integer zero points 0..15)
             w[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]
    G        group_size: 32, 64, 128, ... (K % G == 0), or 0 / K for one group per row (per channel)
    y        [..., N] in x's dtype (or written into `out`, any strides)
qweight, scales, zeros and out may have any strides. x is read as 32-bit words (below), so its rows
must be 4-byte aligned with a unit column stride; other x is first copied into a contiguous buffer.

Pairs of columns. Byte j of a weight row holds columns 2j and 2j + 1, and so does 32-bit word j of a
row of x (two 16-bit floats, column 2j in the low half: little endian). Every kernel here walks K in
such pairs: one vectorized load gives a tile of bytes, one the matching words of x, and shifts split
both into their even-column and odd-column halves, so y = x_even @ w_even^T + x_odd @ w_odd^T with no
interleaving of registers and no strided loads.

Roofline (H100 SXM: 3.35 TB/s HBM, 132 SMs at ~1.98 GHz, 128 fp32 FMA and 64 int32 lanes per SM):
- Decode, int4_gemv (M <= 8): memory bound. The packed weight, N * K / 2 bytes, is read exactly once
  (scales and zeros add 3 bytes per group of a row: 5% at G = 128); x, y and the split-K partials are
  noise. Mistral-7B's projections: 6144x4096 12.6 MB, 4096x4096 8.4 MB, 28672x4096 58.7 MB,
  4096x14336 29.4 MB, i.e. 3.8 / 2.5 / 17.5 / 8.8 us at the full 3.35 TB/s; the target, > 2 TB/s, is
  6.3 / 4.2 / 29 / 15 us. Full bandwidth streams ~6.7e12 int4 weights/s, 25 per SM clock, leaving ~5
  fp32 and ~2.5 integer instructions per weight. Hence the per-weight work is one nibble extraction,
  one int->float and M FMAs:
  * int -> float through the exponent: OR-ing v (0 <= v < 2**23) into the mantissa of 2.0**23 gives
    the float 2**23 + v, and one FSUB of (2**23 + zero) leaves v - zero exactly. The I2F instruction
    this replaces issues at 16/clk/SM: ~4e12 conversions/s, alone a cap of ~2 TB/s on an int4 GEMV.
  * the scale is applied per (row, group, x row) after reducing a chunk of one group, not per weight:
    each chunk of K lies inside one group (CHUNK divides G), so sum_k x * (q - z) * s =
    s * sum_k x * (q - z). (Folding the zero as z * sum(x) would not save the FSUB: the int->float
    conversion needs one anyway, and subtracting the zero there is free.)
  The budget is tight, and issue-bound before it is memory-bound. Compiled for sm_90 (Triton 3.9, not
  run), the main loop at the defaults issues ~7.3 instructions per weight at M = 1 (a ceiling of ~2.3
  TB/s at 4 warp-instructions per SM clock), ~15 at M = 4, ~25 at M = 8: per x row a product, half a
  reduction add (Triton's in-thread reduction is a tree, so only half the products fuse into FFMAs)
  and the x unpacking. Hence the GEMM below, whose per-weight work does not grow with M, is the
  candidate for M >= 2; the dispatcher's default (GEMV up to M = 4) is the brief's, to be measured.
  When N / BLOCK_N programs alone cannot fill the SMs (N = 4096 gives 64 at BLOCK_N = 64), K is split
  over SPLIT_K programs per tile; each writes an fp32 partial [M, N] and a second tiny kernel sums the
  partials into y (deterministic, unlike atomics, and needs no zeroed buffer).
- Prefill, int4_gemm: 2 * M * N * K FLOPs on tensor cores (tl.dot, fp32 accumulation: wgmma from
  BLOCK_M = 64, mma.sync below). Each program dequantizes its [BLOCK_N, K] weight slab once per
  BLOCK_M rows of x, so the dequantization costs N * K * M / BLOCK_M unpack-and-scale operations
  (~7.5-8.5 instructions per weight in sm_90 SASS): large BLOCK_M (and BLOCK_N) amortize it. For large
  M, dequantize_int4 (N * K / 2 bytes in, 2 * N * K bytes out: ~14 us for 4096x4096) followed by cuBLAS
  may win; int4_matmul takes that path above `dequant_min_m`. The GEMM splits K like the GEMV when its
  tiles are too few, so at BLOCK_M = 16 it doubles as a tensor-core GEMV for a few rows.
- dequantize_int4: memory bound, 0.5 byte read and 2 bytes written per weight; output words are
  packed from the pair of 16-bit values, so stores are contiguous 32-bit (vectorized) writes.

The GEMM dequantizes exactly like the reference: (q - z) * s in fp32, rounded once to x's dtype.

Every block size, split and warp count is a keyword argument; the defaults are starting points to be
tuned on the GPU (see each function).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kiln.errors import KilnError
from kiln.kernels import num_sms, split_counters
from kiln.kernels.activation import silu_and_mul
from kiln.kernels.pdl import grid_dependency_sync, launch_dependents, pdl_args, warm_rows

# The MLP's down projection at one row reads silu(gate) * up from gate_up's output inside int4_gemv1
# (KILN_FUSE_GATE=0: a SiLU-and-mul kernel first, as for every other path; for measuring the two).
FUSE_GATE = os.environ.get("KILN_FUSE_GATE", "1")
if FUSE_GATE not in ("0", "1"):
    raise KilnError(f"KILN_FUSE_GATE={FUSE_GATE!r} is not 1 (the default: the one-row int4 GEMV applies "
                    "SiLU-and-mul to its input itself) or 0 (a SiLU-and-mul kernel first)")
FUSE_GATE = FUSE_GATE == "1"

# 2.0**23 and its fp32 bit pattern: see "int -> float through the exponent" above.
EXP23 = tl.constexpr(8388608.0)
EXP23_BITS = tl.constexpr(0x4B000000)


# --- helpers shared with int8_matmul and fp8_matmul ------------------------------------------------


@triton.jit
def load_group_param(
    ptr, offs_n, n_mask, i_first, offs_i, i_mask, stride_n, stride_g,
    GROUP: tl.constexpr, SCALAR_GROUP: tl.constexpr,
):
    """fp32 scale (or zero) of the weight tile [offs_n, offs_i] (i counts columns or pairs; GROUP is in
    the same unit). [BLOCK_N, 1] when the caller knows the tile lies in one group (the one of i_first),
    else gathered per element: [BLOCK_N, BLOCK_I]."""
    if SCALAR_GROUP:
        p = tl.load(ptr + offs_n * stride_n + (i_first // GROUP) * stride_g, mask=n_mask, other=0)
        p = p.to(tl.float32)[:, None]
    else:
        g = offs_i // GROUP
        p = tl.load(ptr + offs_n[:, None] * stride_n + g[None, :] * stride_g,
                    mask=n_mask[:, None] & i_mask[None, :], other=0)
        p = p.to(tl.float32)
    return p


@triton.jit
def _sum_splits_kernel(
    part_ptr, out_ptr, M, N, n_splits, stride_om, stride_on, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    """out[m, n] = sum_s part[s, m, n] (part: contiguous fp32 [n_splits, M, N]), in out's dtype."""
    grid_dependency_sync(USE_PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(n_splits):
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    m = offs // N
    n = offs % N
    tl.store(out_ptr + m * stride_om + n * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_splits(part: torch.Tensor, out: torch.Tensor) -> None:
    """Reduce split-K partials: part fp32 [n_splits, M, N] contiguous -> out [M, N] (any strides)."""
    n_splits, m, n = part.shape
    block = 1024
    _sum_splits_kernel[(triton.cdiv(m * n, block),)](
        part, out, m, n, n_splits, out.stride(0), out.stride(1), BLOCK=block, **pdl_args(out.device),
    )


def auto_split_k(n_programs: int, k_blocks: int, device: torch.device, per_sm: int = 2) -> int:
    """Split K until a GEMV launch has about `per_sm` programs per SM; 1 when its tiles alone fill the
    GPU that far.

    A heuristic from shapes only (CUDA-graph safe); the tuner replaces it per shape.
    """
    sms = num_sms(device)
    if n_programs >= per_sm * sms:
        return 1
    return max(1, min(k_blocks, per_sm * sms // n_programs))


def split_plan(
    k_units: int, block: int, split_k: int | None, n_programs: int, device: torch.device
) -> tuple[int, int]:
    """(units per split, number of splits): splits start on multiples of `block` and none is empty."""
    k_blocks = triton.cdiv(k_units, block)
    if split_k is None:
        split_k = auto_split_k(n_programs, k_blocks, device)
    per_split = triton.cdiv(k_blocks, max(1, min(split_k, k_blocks))) * block
    return per_split, triton.cdiv(k_units, per_split)


def as_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., K] -> [M, K] (a view when possible)."""
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {k}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x must be fp16 or bf16, got {x.dtype}")
    return x.reshape(-1, k)


def output_rows(
    x: torch.Tensor, m: int, n: int, out: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the tensor to return, its [M, N] view to write): a new [..., N] tensor in x's dtype, or `out`."""
    if out is None:
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    elif out.shape[-1] != n or out.numel() != m * n or out.dtype != x.dtype:
        raise ValueError(f"out must hold {m} x {n} values of {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    return out, out.view(m, n)


def group_of(k: int, n_groups: int, group_size: int) -> int:
    """Validated group size in columns (group_size 0 means one group per row)."""
    group = group_size or k
    if k % group or k // group != n_groups:
        raise ValueError(f"group_size {group_size} does not match K = {k} with {n_groups} scale groups")
    return group


def chunk_in_group(block: int, group: int, n_groups: int) -> int:
    """Largest power-of-two chunk <= block that never straddles a group boundary (block if one group)."""
    return block if n_groups == 1 else min(block, group & -group)


def group_constexpr(group: int, n_groups: int) -> int:
    """The group size as the kernels take it, a compile-time constant (so `i // GROUP` is a shift, not a
    ~20-instruction division): one group per row becomes a power of two >= K, which every index
    divides to 0 and which does not recompile for every K."""
    return triton.next_power_of_2(group) if n_groups == 1 else group


def splits_target(out2: torch.Tensor, n_splits: int) -> tuple[torch.Tensor, int]:
    """Where a split-K kernel writes: y itself, or fp32 partials [n_splits, M, N] (and their stride)."""
    if n_splits == 1:
        return out2, 0
    part = torch.empty(n_splits, *out2.shape, dtype=torch.float32, device=out2.device)
    return part, part.stride(0)


# --- int4 ------------------------------------------------------------------------------------------


@triton.jit
def _nibble_minus_zero(nib, zero_plus_exp23):
    """int32 values 0..15 and fp32 (2**23 + zero) -> fp32 nib - zero, exact, without an I2F."""
    return (nib | EXP23_BITS).to(tl.float32, bitcast=True) - zero_plus_exp23


@triton.jit
def _split_words(words, X_BF16: tl.constexpr):
    """int32 words holding two 16-bit floats -> (low halves, high halves) as bf16 or fp16."""
    lo = words.to(tl.int16)  # truncation keeps the low half
    hi = (words >> 16).to(tl.int16)
    if X_BF16:
        x_lo = lo.to(tl.bfloat16, bitcast=True)
        x_hi = hi.to(tl.bfloat16, bitcast=True)
    else:
        x_lo = lo.to(tl.float16, bitcast=True)
        x_hi = hi.to(tl.float16, bitcast=True)
    return x_lo, x_hi


@triton.jit
def _words_to_f32(words, X_BF16: tl.constexpr):
    """int32 words holding two 16-bit floats -> (low halves, high halves) as fp32. A bf16 is the top half
    of its fp32, so that case is one shift and one mask."""
    if X_BF16:
        lo = (words << 16).to(tl.float32, bitcast=True)
        hi = (words & -65536).to(tl.float32, bitcast=True)  # -65536 == 0xFFFF0000
    else:
        lo = words.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (words >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _pack_words(lo, hi, OUT_BF16: tl.constexpr):
    """fp32 values -> int32 words holding them rounded to bf16 / fp16, `lo` in the low half."""
    if OUT_BF16:
        lo16 = lo.to(tl.bfloat16).to(tl.int16, bitcast=True)
        hi16 = hi.to(tl.bfloat16).to(tl.int16, bitcast=True)
    else:
        lo16 = lo.to(tl.float16).to(tl.int16, bitcast=True)
        hi16 = hi.to(tl.float16).to(tl.int16, bitcast=True)
    return (lo16.to(tl.int32) & 0xFFFF) | (hi16.to(tl.int32) << 16)


def _x_words(x2: torch.Tensor) -> torch.Tensor:
    """[M, K] 16-bit -> [M, K // 2] int32 view (copied first when not 4-byte aligned, unit stride)."""
    aligned = x2.stride(1) == 1 and x2.stride(0) % 2 == 0 and x2.storage_offset() % 2 == 0
    if not aligned:
        x2 = x2.clone(memory_format=torch.contiguous_format)
    return x2.view(torch.int32)


def _check(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, int, int, int]:
    """-> (x as [M, K], N, K, group size in columns)."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if qweight.dtype != torch.uint8:
        raise ValueError(f"int4 qweight must be uint8 [N, K // 2], got {qweight.dtype}")
    if scales.shape[0] != n or zeros.shape != scales.shape:
        raise ValueError(
            f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} do not fit qweight [{n}, {k // 2}]"
        )
    group = group_of(k, scales.shape[1], group_size)
    if group % 2:
        raise ValueError("int4 groups must hold whole bytes (an even group size)")
    return as_rows(x, k), n, k, group


@triton.jit
def _int4_gemv_kernel(
    xw_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    M, N, KH, split_pairs,
    stride_xm, stride_qn, stride_qj, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_os, stride_om, stride_on,
    X_BF16: tl.constexpr, GROUP_PAIRS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr, CHUNK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    grid_dependency_sync(USE_PDL)
    # Program (n tile, K split, M block). KH = K // 2 pairs; BLOCK_KH pairs per loop step, walked in
    # CHUNK-pair pieces that each lie inside one group (the unrolled pieces also give the loads ILP).
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    m0 = tl.program_id(2) * BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = m0 + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # transposed: rows of W along dim 0

    j_start = pid_s * split_pairs
    j_end = tl.minimum(j_start + split_pairs, KH)
    for j0 in range(j_start, j_end, BLOCK_KH):
        for c in tl.static_range(0, BLOCK_KH, CHUNK):
            offs_j = j0 + c + tl.arange(0, CHUNK)
            j_mask = offs_j < KH
            q = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_j[None, :] * stride_qj,
                        mask=n_mask[:, None] & j_mask[None, :], other=0).to(tl.int32)
            # A piece past K (only the last step's, all masked) reads the last group's parameters.
            g = tl.minimum(j0 + c, KH - 1) // GROUP_PAIRS
            s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0).to(tl.float32)
            z = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=n_mask, other=0).to(tl.float32)
            z = (z + EXP23)[:, None]
            w_lo = _nibble_minus_zero(q & 15, z)  # even columns, q - zero as exact fp32
            w_hi = _nibble_minus_zero(q >> 4, z)  # odd columns
            for m in tl.static_range(BLOCK_M):
                # The same CHUNK words of x serve every row of the tile (L1 hits after the first). Rows
                # past M read row M - 1 again instead of masking: their results are never stored.
                row = tl.minimum(m0 + m, M - 1)
                xw = tl.load(xw_ptr + row * stride_xm + offs_j, mask=j_mask, other=0)
                x_lo, x_hi = _words_to_f32(xw, X_BF16)
                # Two sums, not one sum of (lo + hi) products: each in-thread reduction then contracts
                # into one FFMA per weight, where the sum of pairs costs an FMUL, FFMA and FADD per two.
                part = tl.sum(w_lo * x_lo[None, :], axis=1) + tl.sum(w_hi * x_hi[None, :], axis=1)
                acc = tl.where(offs_m[None, :] == m0 + m, acc + (part * s)[:, None], acc)

    launch_dependents(USE_PDL)  # main loop done: the next kernel may start (KILN_PDL=late)
    out_ptrs = out_ptr + pid_s * stride_os + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & (offs_m[None, :] < M))


# The bit patterns _byte_as_floats works with (see there). They reach the kernel as arguments, not as
# literals: ptxas would otherwise rematerialize each literal into a fresh register before every use
# (measured: ~0.8 extra instructions per weight in the sm_90 SASS).
BYTE_MASK_HI, BYTE_MASK_LO, ONE_BITS = 0x780000, 0x78000, 0x3F800000


@triton.jit
def _byte_as_floats(words, j: tl.constexpr, mask_hi, mask_lo, one_bits):
    """Byte j of int32 words -> (1 + hi/16, 1 + lo/256) as fp32, exactly, for its high and low nibble:
    one shift puts the high nibble at mantissa bits 19..22 and the low one at 15..18, and one and-or
    each sets the exponent of 1.0 above it. Two weights per shift, no int -> float conversion."""
    if 15 - 8 * j >= 0:
        t = words << (15 - 8 * j)
    else:
        t = words >> (8 * j - 15)
    hi = ((t & mask_hi) | one_bits).to(tl.float32, bitcast=True)
    lo = ((t & mask_lo) | one_bits).to(tl.float32, bitcast=True)
    return hi, lo


@triton.jit
def _word_products(acc, words, x_ptr, offs_w, w_mask, mask_hi, mask_lo, one_bits, CW: tl.constexpr,
                   GATED: tl.constexpr, up_offset):
    """acc [BLOCK_N, CW] fp32 plus, per word of `words` [BLOCK_N, CW] (int32, 8 nibbles: columns 8w..8w+7),
    sum_odd x (1 + q/16) + sum_even 16 x (1 + q/256) = A + (1/16) sum x q. Returns (acc, A, S) with
    A [CW] = sum_odd x + 16 sum_even x and S [CW] = sum x over each word's 8 columns.

    x is read as one [CW, 8] tile (16-byte loads) and split in registers into the 8 vectors x_i[w] =
    x[8w + i]; each is loaded and converted once per program step and reused by every row a thread
    holds, so x costs a fraction of an instruction per weight instead of a load and a convert.

    GATED: x_ptr holds [gate, up] (up at x_ptr + up_offset) and x is silu(gate) * up, rounded to x's
    dtype as kernels/activation.py rounds it, computed here once per program step."""
    x_ptrs = x_ptr + offs_w[:, None] * 8 + tl.arange(0, 8)[None, :]
    xt = tl.load(x_ptrs, mask=w_mask[:, None], other=0.0).to(tl.float32)
    if GATED:
        up = tl.load(x_ptrs + up_offset, mask=w_mask[:, None], other=0.0).to(tl.float32)
        xt = (xt / (1.0 + tl.exp(-xt)) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
    xt = xt.reshape(CW, 2, 2, 2)  # column 8w + 4a + 2b + c at [w, a, b, c]
    even, odd = tl.split(xt)  # c = 0 / 1
    e0, e1 = tl.split(even)  # b
    o0, o1 = tl.split(odd)
    x0, x4 = tl.split(e0)  # a
    x2, x6 = tl.split(e1)
    x1, x5 = tl.split(o0)
    x3, x7 = tl.split(o1)
    # one FFMA per weight (kept as separate additions so that each contracts)
    hi, lo = _byte_as_floats(words, 0, mask_hi, mask_lo, one_bits)
    acc = acc + hi * x1[None, :]
    acc = acc + lo * (16.0 * x0)[None, :]
    hi, lo = _byte_as_floats(words, 1, mask_hi, mask_lo, one_bits)
    acc = acc + hi * x3[None, :]
    acc = acc + lo * (16.0 * x2)[None, :]
    hi, lo = _byte_as_floats(words, 2, mask_hi, mask_lo, one_bits)
    acc = acc + hi * x5[None, :]
    acc = acc + lo * (16.0 * x4)[None, :]
    hi, lo = _byte_as_floats(words, 3, mask_hi, mask_lo, one_bits)
    acc = acc + hi * x7[None, :]
    acc = acc + lo * (16.0 * x6)[None, :]
    x_odd = (x1 + x3) + (x5 + x7)
    x_even = (x0 + x2) + (x4 + x6)
    return acc, x_odd + 16.0 * x_even, x_odd + x_even


@triton.jit
def _int4_gemv1_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, part_ptr, count_ptr,
    N, KW, split_words,
    stride_qn, stride_sn, stride_sg, stride_zn, stride_zg, stride_on,
    mask_hi, mask_lo, one_bits,
    GROUP_WORDS: tl.constexpr, BLOCK_N: tl.constexpr, CW: tl.constexpr, PREFETCH: tl.constexpr,
    FUSED_SPLITS: tl.constexpr, WARM: tl.constexpr, GATED: tl.constexpr, USE_PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_start = pid_s * split_words
    w_end = tl.minimum(w_start + split_words, KW)
    if USE_PDL:  # while the kernel before ends, this program's weight lines into L2 (32 words a line)
        warm_rows(qw_ptr + offs_n * stride_qn, w_start, w_end, n_mask, 1, 32, WARM)
    grid_dependency_sync(USE_PDL)
    # One row of x (M = 1). Program (n tile, K split); a split is a whole number of groups and of steps.
    # The weight is read as int32 words of 8 nibbles (columns 8j..8j+7), CW words of BLOCK_N rows per
    # step. Per weight: half a shift, an and-or into a float 1 + q/16 or 1 + q/256, an FFMA; the zero point
    # and the scale are applied once per (row, group) (_word_products: acc = A + sum x q / 16):
    # sum x (q - z) = 16 (acc - A) - z S.
    offs_c = tl.arange(0, CW)
    out = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if GROUP_WORDS >= CW:  # a group takes one or more steps (CW divides GROUP_WORDS)
        for g0 in range(w_start, w_end, GROUP_WORDS):
            acc = tl.zeros((BLOCK_N, CW), dtype=tl.float32)
            a_sum = tl.zeros((CW,), dtype=tl.float32)
            x_sum = tl.zeros((CW,), dtype=tl.float32)
            for c in range(0, GROUP_WORDS, CW):
                offs_w = g0 + c + offs_c
                w_mask = offs_w < KW
                words = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_w[None, :],
                                mask=n_mask[:, None] & w_mask[None, :], other=0)
                acc, a, xs = _word_products(acc, words, x_ptr, offs_w, w_mask, mask_hi, mask_lo, one_bits, CW,
                                             GATED, KW * 8)
                a_sum += a
                x_sum += xs
            g = g0 // GROUP_WORDS
            sc = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0).to(tl.float32)
            z = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=n_mask, other=0).to(tl.float32)
            sv = tl.sum(acc, axis=1) - tl.sum(a_sum, axis=0)
            out += sc * (16.0 * sv - z * tl.sum(x_sum, axis=0))
    else:  # a step spans CW // GROUP_WORDS whole groups (both powers of two)
        CG: tl.constexpr = CW // GROUP_WORDS
        n_groups = KW // GROUP_WORDS
        w_ptrs = qw_ptr + offs_n[:, None] * stride_qn + offs_c[None, :]
        if PREFETCH:  # the next step's words are loaded before this step's math (twice the registers)
            nxt = tl.load(w_ptrs + w_start, mask=n_mask[:, None] & (w_start + offs_c < w_end)[None, :], other=0)
        for w0 in range(w_start, w_end, CW):
            offs_w = w0 + offs_c
            w_mask = offs_w < KW
            if PREFETCH:
                words = nxt
                nxt = tl.load(w_ptrs + w0 + CW, mask=n_mask[:, None] & (offs_w + CW < w_end)[None, :], other=0)
            else:
                words = tl.load(w_ptrs + w0, mask=n_mask[:, None] & w_mask[None, :], other=0)
            acc = tl.zeros((BLOCK_N, CW), dtype=tl.float32)
            acc, a, xs = _word_products(acc, words, x_ptr, offs_w, w_mask, mask_hi, mask_lo, one_bits, CW,
                                             GATED, KW * 8)
            sv = tl.sum(acc.reshape(BLOCK_N, CG, GROUP_WORDS), axis=2)
            sa = tl.sum(a.reshape(CG, GROUP_WORDS), axis=1)
            sx = tl.sum(xs.reshape(CG, GROUP_WORDS), axis=1)
            g = w0 // GROUP_WORDS + tl.arange(0, CG)
            gmask = n_mask[:, None] & (g < n_groups)[None, :]
            sc = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :] * stride_sg, mask=gmask, other=0)
            z = tl.load(z_ptr + offs_n[:, None] * stride_zn + g[None, :] * stride_zg, mask=gmask, other=0)
            part = 16.0 * (sv - sa[None, :]) - z.to(tl.float32) * sx[None, :]
            out += tl.sum(sc.to(tl.float32) * part, axis=1)
    launch_dependents(USE_PDL)  # main loop done: the next kernel may start (KILN_PDL=late)
    if FUSED_SPLITS:
        # Each split stores its fp32 partial, then counts itself in per output element (acq_rel); the
        # split that arrives last for an element sums the partials in split order (deterministic),
        # writes y and puts the counter back to 0 for the next call: no second kernel.
        tl.store(part_ptr + pid_s * N + offs_n, out, mask=n_mask)
        tl.debug_barrier()
        seen = tl.atomic_add(count_ptr + offs_n, 1, mask=n_mask, sem="acq_rel")
        last = n_mask & (seen == tl.num_programs(1) - 1)
        out = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for s in range(tl.num_programs(1)):
            out += tl.load(part_ptr + s * N + offs_n, mask=last, other=0.0)
        tl.store(out_ptr + offs_n * stride_on, out.to(out_ptr.dtype.element_ty), mask=last)
        tl.store(count_ptr + offs_n, tl.zeros((BLOCK_N,), dtype=tl.int32), mask=last)
    else:
        tl.store(out_ptr + offs_n * stride_on, out.to(out_ptr.dtype.element_ty), mask=n_mask)


def _words_ok(qweight: torch.Tensor, group: int) -> bool:
    """Whether qweight can be read as int32 words of whole groups (the single-row kernel's layout)."""
    return (
        qweight.stride(1) == 1 and qweight.shape[1] % 4 == 0 and qweight.stride(0) % 4 == 0
        and qweight.storage_offset() % 4 == 0 and qweight.data_ptr() % 4 == 0 and group % 8 == 0
    )


def int4_gemv1(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    out: torch.Tensor | None = None,
    *,
    block_n: int = 128,
    chunk_words: int = 16,
    split_k: int | None = None,
    num_warps: int = 4,
    prefetch: int = 0,
    warm: int = 1,
    gated: bool = False,
) -> torch.Tensor:
    """y = x @ W^T for one row of x (decode at batch 1), under four instructions per weight.

    Needs K and the group size to be multiples of 8 and qweight 4-byte aligned (int4_matmul checks and
    falls back to the general GEMV otherwise). block_n: weight rows per program (each thread holds
    several, which share the thread's x). chunk_words: int32 words (8 columns each) per step, a power
    of two; a step covers part of a group, or several whole groups when the group is a smaller power of
    two. split_k: programs along K, in whole groups and steps (None: `auto_split_k`). prefetch: load each
    step's words one step ahead (steps of several groups only). warm: where the launch overlaps the
    kernel before (kernels/pdl.py), each program first asks for its share of the weight into L2 (1),
    only the first two 128-byte lines of each of its rows (2), or nothing (0).
    gated: x is [1, 2K], gate then up, and the product is taken with silu(gate) * up (the MLP's down
    projection reading gate_up's output: no SiLU-and-mul kernel before it).
    """
    if gated:
        x = _gate_half(x, 2 * qweight.shape[1])
    x2, n, k, group = _check(x, qweight, scales, zeros, group_size)
    if x2.shape[0] != 1 or not _words_ok(qweight, group):
        raise ValueError("int4_gemv1 takes one row of x and a word-aligned qweight with groups of 8k columns")
    if chunk_words < 1 or chunk_words & (chunk_words - 1):
        raise ValueError(f"chunk_words must be a power of two, got {chunk_words}")
    result, out2 = output_rows(x, 1, n, out)
    if n == 0:
        return result
    if x2.stride(1) != 1:
        if gated:
            raise ValueError("a gated x must have a unit column stride (up is read beside gate)")
        x2 = x2.contiguous()
    kw, gw = k // 8, group // 8
    pow2_group = gw & (gw - 1) == 0
    cw = chunk_words if pow2_group and chunk_words > gw else min(chunk_words, gw & -gw)
    unit = max(gw, cw)  # words per indivisible piece of a split
    grid_n = triton.cdiv(n, block_n)
    n_units = triton.cdiv(kw, unit)
    splits = split_k or auto_split_k(grid_n, n_units, x.device, per_sm=4)  # small programs: 4 per SM
    split_words = triton.cdiv(n_units, max(1, min(splits, n_units))) * unit
    n_splits = triton.cdiv(kw, split_words)
    fused = n_splits > 1
    part = torch.empty(n_splits, n, dtype=torch.float32, device=x.device) if fused else out2
    counters = split_counters(x.device, n) if fused else out2
    _int4_gemv1_kernel[(grid_n, n_splits)](
        x2, qweight.view(torch.int32), scales, zeros, out2, part, counters,
        n, kw, split_words,
        qweight.stride(0) // 4, scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1), out2.stride(1),
        BYTE_MASK_HI, BYTE_MASK_LO, ONE_BITS,
        GROUP_WORDS=gw, BLOCK_N=block_n, CW=cw, PREFETCH=bool(prefetch), FUSED_SPLITS=fused, WARM=int(warm),
        GATED=gated, num_warps=num_warps, **pdl_args(x.device, late=True),
    )
    return result


def _gate_half(x: torch.Tensor, k: int) -> torch.Tensor:
    """The gate half of a gated input [..., 2K] as an [..., K] view (the kernel reads up beside it)."""
    if x.shape[-1] != 2 * k:
        raise ValueError(f"a gated x holds gate and up: last dimension {2 * k}, got {x.shape[-1]}")
    return x[..., :k]


def int4_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    out: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int = 64,
    block_k: int = 128,
    split_k: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """Decode-shaped y = x @ W^T (M small): reads the packed weight once per block of `block_m` rows.

    block_m: rows of x per program (default next_power_of_2(M), at most 8; larger M re-reads W once
    per block). block_k: K columns per loop step (walked in chunks that stay inside a group).
    split_k: programs per output tile along K (None: `auto_split_k`); > 1 adds a reduction kernel.
    """
    x2, n, k, group = _check(x, qweight, scales, zeros, group_size)
    m = x2.shape[0]
    result, out2 = output_rows(x, m, n, out)
    if m == 0 or n == 0:
        return result
    block_m = block_m or min(8, triton.next_power_of_2(m))
    block_kh = max(1, block_k // 2)
    kh, group_pairs, n_groups = k // 2, group // 2, scales.shape[1]
    grid_n, grid_m = triton.cdiv(n, block_n), triton.cdiv(m, block_m)
    split_pairs, n_splits = split_plan(kh, block_kh, split_k, grid_n * grid_m, x.device)
    target, stride_os = splits_target(out2, n_splits)
    xw = _x_words(x2)
    _int4_gemv_kernel[(grid_n, n_splits, grid_m)](
        xw, qweight, scales, zeros, target,
        m, n, kh, split_pairs,
        xw.stride(0), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        zeros.stride(0), zeros.stride(1),
        stride_os, target.stride(-2), target.stride(-1),
        X_BF16=x.dtype == torch.bfloat16, GROUP_PAIRS=group_constexpr(group_pairs, n_groups),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KH=block_kh,
        CHUNK=chunk_in_group(block_kh, group_pairs, n_groups), num_warps=num_warps,
        **pdl_args(x.device, late=True),
    )
    if n_splits > 1:
        sum_splits(target, out2)
    return result


@triton.jit
def _int4_gemm_kernel(
    xw_ptr, qw_ptr, s_ptr, z_ptr, out_ptr,
    M, N, KH, split_pairs,
    stride_xm, stride_qn, stride_qj, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_os, stride_om, stride_on,
    X_BF16: tl.constexpr, GROUP_PAIRS: tl.constexpr, SCALAR_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr, GROUP_M: tl.constexpr,
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
    x_rows = xw_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    j_start = pid_s * split_pairs
    j_end = tl.minimum(j_start + split_pairs, KH)
    for j0 in range(j_start, j_end, BLOCK_KH):
        offs_j = j0 + tl.arange(0, BLOCK_KH)
        j_mask = offs_j < KH
        xw = tl.load(x_rows + offs_j[None, :], mask=m_mask[:, None] & j_mask[None, :], other=0)
        x_lo, x_hi = _split_words(xw, X_BF16)
        q = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_j[None, :] * stride_qj,
                    mask=n_mask[:, None] & j_mask[None, :], other=0).to(tl.int32)
        s = load_group_param(s_ptr, offs_n, n_mask, j0, offs_j, j_mask, stride_sn, stride_sg,
                             GROUP_PAIRS, SCALAR_GROUP)
        z = load_group_param(z_ptr, offs_n, n_mask, j0, offs_j, j_mask, stride_zn, stride_zg,
                             GROUP_PAIRS, SCALAR_GROUP) + EXP23
        w_lo = (_nibble_minus_zero(q & 15, z) * s).to(x_lo.dtype)
        w_hi = (_nibble_minus_zero(q >> 4, z) * s).to(x_lo.dtype)
        acc = tl.dot(x_lo, tl.trans(w_lo), acc)
        acc = tl.dot(x_hi, tl.trans(w_hi), acc)

    out_ptrs = (out_ptr + pid_s * stride_os + offs_m.to(tl.int64)[:, None] * stride_om
                + offs_n[None, :] * stride_on)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def int4_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
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
    """Prefill-shaped y = x @ W^T on tensor cores, the int4 tile dequantized in registers.

    block_m: default next_power_of_2(M) clamped to [16, 64]. block_k: K columns per step (>= 32: each
    of the two dots, even and odd columns, takes block_k / 2 >= 16). When a step spans several groups
    (block_k > G) the scales and zeros are gathered per element instead of per row. split_k: programs
    per output tile along K (None: `auto_split_k`, 1 once the tiles fill the GPU); with block_m 16 this
    is also a tensor-core GEMV for a few rows, whose per-weight work does not grow with M.
    """
    x2, n, k, group = _check(x, qweight, scales, zeros, group_size)
    m = x2.shape[0]
    result, out2 = output_rows(x, m, n, out)
    if m == 0 or n == 0:
        return result
    block_m = block_m or min(64, max(16, triton.next_power_of_2(m)))
    block_kh = block_k // 2
    if min(block_m, block_n, block_kh) < 16:
        raise ValueError("tl.dot needs block_m, block_n >= 16 and block_k >= 32")
    kh, group_pairs, n_groups = k // 2, group // 2, scales.shape[1]
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_pairs, n_splits = split_plan(kh, block_kh, split_k, tiles, x.device)
    target, stride_os = splits_target(out2, n_splits)
    xw = _x_words(x2)
    _int4_gemm_kernel[(tiles, n_splits)](
        xw, qweight, scales, zeros, target,
        m, n, kh, split_pairs,
        xw.stride(0), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        zeros.stride(0), zeros.stride(1), stride_os, target.stride(-2), target.stride(-1),
        X_BF16=x.dtype == torch.bfloat16, GROUP_PAIRS=group_constexpr(group_pairs, n_groups),
        SCALAR_GROUP=n_groups == 1 or group_pairs % block_kh == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KH=block_kh, GROUP_M=group_m,
        num_warps=num_warps, num_stages=num_stages, **pdl_args(x.device),
    )
    if n_splits > 1:
        sum_splits(target, out2)
    return result


@triton.jit
def _dequant_int4_kernel(
    qw_ptr, s_ptr, z_ptr, out_ptr,
    N, KH,
    stride_qn, stride_qj, stride_sn, stride_sg, stride_zn, stride_zg, stride_on,
    OUT_BF16: tl.constexpr, GROUP_PAIRS: tl.constexpr, SCALAR_GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr, USE_PDL: tl.constexpr,
):
    grid_dependency_sync(USE_PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j0 = tl.program_id(1) * BLOCK_KH
    offs_j = j0 + tl.arange(0, BLOCK_KH)
    n_mask = offs_n < N
    j_mask = offs_j < KH
    mask = n_mask[:, None] & j_mask[None, :]
    q = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_j[None, :] * stride_qj, mask=mask, other=0)
    q = q.to(tl.int32)
    s = load_group_param(s_ptr, offs_n, n_mask, j0, offs_j, j_mask, stride_sn, stride_sg, GROUP_PAIRS,
                         SCALAR_GROUP)
    z = load_group_param(z_ptr, offs_n, n_mask, j0, offs_j, j_mask, stride_zn, stride_zg, GROUP_PAIRS,
                         SCALAR_GROUP) + EXP23
    words = _pack_words(_nibble_minus_zero(q & 15, z) * s, _nibble_minus_zero(q >> 4, z) * s, OUT_BF16)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_j[None, :], words, mask=mask)


def dequantize_int4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype,
    *,
    block_n: int = 32,
    block_k: int = 256,
    num_warps: int = 4,
) -> torch.Tensor:
    """The full weight [N, K] in `dtype` (fp16 or bf16), equal to quant.formats.dequantize_int."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"dequantize_int4 writes fp16 or bf16, not {dtype}")
    n, kh = qweight.shape
    group = group_of(2 * kh, scales.shape[1], group_size)
    out = torch.empty(n, 2 * kh, dtype=dtype, device=qweight.device)
    if out.numel() == 0:
        return out
    words = out.view(torch.int32)  # [N, K // 2]: word j holds columns 2j (low half) and 2j + 1
    block_kh = block_k // 2
    group_pairs, n_groups = group // 2, scales.shape[1]
    grid = (triton.cdiv(n, block_n), triton.cdiv(kh, block_kh))
    _dequant_int4_kernel[grid](
        qweight, scales, zeros, words,
        n, kh,
        qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        zeros.stride(0), zeros.stride(1), words.stride(0),
        OUT_BF16=dtype == torch.bfloat16, GROUP_PAIRS=group_constexpr(group_pairs, n_groups),
        SCALAR_GROUP=n_groups == 1 or group_pairs % block_kh == 0,
        BLOCK_N=block_n, BLOCK_KH=block_kh, num_warps=num_warps, **pdl_args(qweight.device),
    )
    return out


def int4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    out: torch.Tensor | None = None,
    *,
    gemv_max_m: int = 4,
    dequant_min_m: int | None = None,
    gemv: dict[str, int] | None = None,
    gemm: dict[str, int] | None = None,
    gemv1: dict[str, int] | None = None,
    use_gemv1: bool = True,
    gated: bool = False,
) -> torch.Tensor:
    """y = x @ W^T for the int4 format, the path picked by M (rows of x):
    M == 1 (and a word-aligned layout): int4_gemv1 with the `gemv1` block sizes, unless use_gemv1 is off;
    M <= gemv_max_m: int4_gemv; M >= dequant_min_m (None: never): dequantize_int4, then cuBLAS;
    otherwise int4_gemm. gemv / gemm: keyword arguments (block sizes) of those paths. The defaults are
    replaced by the plan kiln build measures for each layer shape (kernels/tuning.py).
    gated: x is [..., 2K], gate then up, and the input is silu(gate) * up: read so by the one-row GEMV
    (no kernel of its own), computed by kernels/activation.py for the other paths."""
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    one_row = m == 1 and use_gemv1 and _words_ok(qweight, group_of(2 * qweight.shape[1], scales.shape[1], group_size))
    if gated and not (one_row and FUSE_GATE and x.stride(-1) == 1):
        x, gated = silu_and_mul(x.reshape(-1, x.shape[-1]).contiguous()).view(*x.shape[:-1], -1), False
    if one_row:
        return int4_gemv1(x, qweight, scales, zeros, group_size, out, gated=gated, **(gemv1 or {}))
    if m <= gemv_max_m:
        return int4_gemv(x, qweight, scales, zeros, group_size, out, **(gemv or {}))
    if dequant_min_m is not None and m >= dequant_min_m:
        x2, n, _, _ = _check(x, qweight, scales, zeros, group_size)
        result, out2 = output_rows(x, m, n, out)
        torch.mm(x2, dequantize_int4(qweight, scales, zeros, group_size, x.dtype).t(), out=out2)
        return result
    return int4_gemm(x, qweight, scales, zeros, group_size, out, **(gemm or {}))
