"""Rotary embedding of q and k fused with the write of k and v into the paged KV cache.

Shapes: positions [T] int64; q [T, heads, D]; k, v [T, kv_heads, D]: strided views (in the model they
are column slices of one qkv tensor [T, (heads + 2 * kv_heads) * D]), any token and head strides, unit
stride along D. cos, sin: [max_positions, D] float32, contiguous rows. k_cache, v_cache:
[num_blocks, block_size, kv_heads, D] (any strides but a unit one along D; contiguous in practice).
slot_mapping [T] int64: flat slot block * block_size + row of each token; a slot < 0 marks a padding
token (CUDA-graph batches are padded) whose k and v are written nowhere. positions must index cos/sin
for every token, padding included: q of padding tokens is rotated all the same.

Rotate-half form (GPT-NeoX / Hugging Face Llama), D even, up to 256, any even D (padding masked):
    out[:D/2] = x1 * cos[:D/2] - x2 * sin[:D/2];  out[D/2:] = x2 * cos[D/2:] + x1 * sin[D/2:]
q is rotated IN PLACE; rotate(k) and v go to the caches (cast to the cache dtype); k and v themselves
are left untouched. The math is float32 with one rounding at the store; reference.rotary_embedding
rounds cos/sin and the two products to q's dtype first, so half-precision results differ by an ulp.

One program per token handles all of its heads: [heads, D/2] tiles of q, [kv_heads, D/2] of k, and
[kv_heads, D] of v; cos and sin are read once per token for all heads.

Roofline: memory bound (~3 FLOPs per element). Bytes per token: q read + written (2 * heads * D),
k read and written to the cache (2 * kv_heads * D), v the same (2 * kv_heads * D), all * elsize, plus
2 * D * 4 of cos/sin (L2 resident). Mistral-7B (32/8 heads, D 128, bf16): 24 KiB a token, 48 MiB at
2048 tokens (~15 us on an H100); a decode batch is launch-latency bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kiln.kernels.pdl import grid_dependency_sync, pdl_args


@triton.jit
def _rotate(ptrs, c1, s1, c2, s2, half, mask):
    """ptrs: [heads, HALF] pointers to x[..., :half]. Returns the two rotated halves of x in fp32."""
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + half, mask=mask, other=0.0).to(tl.float32)
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


@triton.jit
def _rotary_cache_kernel(
    pos_ptr, q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
    stride_kcb, stride_kcr, stride_kch, stride_vcb, stride_vcr, stride_vch,
    n_heads, n_kv_heads, half, block_size,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, USE_PDL: tl.constexpr,
):
    grid_dependency_sync(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok)
    slot = tl.load(slot_ptr + tok)

    d = tl.arange(0, HALF)
    d_ok = d < half
    c1 = tl.load(cos_ptr + pos * stride_cos + d, mask=d_ok, other=0.0)[None, :]
    s1 = tl.load(sin_ptr + pos * stride_cos + d, mask=d_ok, other=0.0)[None, :]
    c2 = tl.load(cos_ptr + pos * stride_cos + half + d, mask=d_ok, other=0.0)[None, :]
    s2 = tl.load(sin_ptr + pos * stride_cos + half + d, mask=d_ok, other=0.0)[None, :]
    cols = d[None, :]

    # q: rotated in place.
    h = tl.arange(0, HEADS)[:, None]
    q_mask = (h < n_heads) & d_ok[None, :]
    q_ptrs = q_ptr + tok * stride_qt + h * stride_qh + cols
    q1, q2 = _rotate(q_ptrs, c1, s1, c2, s2, half, q_mask)
    tl.store(q_ptrs, q1.to(q_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_ptrs + half, q2.to(q_ptr.dtype.element_ty), mask=q_mask)

    # k and v: to the cache slot, unless this is a padding token. slot is int64: caches pass 2**31.
    # A padding token gets zero heads, so its k and v are neither read nor written (and its negative
    # block/row below are never dereferenced).
    kh = tl.arange(0, KV_HEADS)[:, None]
    kv_mask = (kh < tl.where(slot >= 0, n_kv_heads, 0)) & d_ok[None, :]
    blk = slot // block_size
    row = slot % block_size
    k1, k2 = _rotate(k_ptr + tok * stride_kt + kh * stride_kh + cols, c1, s1, c2, s2, half, kv_mask)
    kc_ptrs = kc_ptr + blk * stride_kcb + row * stride_kcr + kh * stride_kch + cols
    tl.store(kc_ptrs, k1.to(kc_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(kc_ptrs + half, k2.to(kc_ptr.dtype.element_ty), mask=kv_mask)

    # v is copied as two halves too, so that it shares the [kv_heads, HALF] tile and mask.
    v_ptrs = v_ptr + tok * stride_vt + kh * stride_vh + cols
    vc_ptrs = vc_ptr + blk * stride_vcb + row * stride_vcr + kh * stride_vch + cols
    v1 = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    v2 = tl.load(v_ptrs + half, mask=kv_mask, other=0.0)
    tl.store(vc_ptrs, v1.to(vc_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(vc_ptrs + half, v2.to(vc_ptr.dtype.element_ty), mask=kv_mask)


def rotary_and_cache_write(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Rotates q in place and writes rotate(k), v into k_cache, v_cache at slot_mapping (see the module
    docstring for shapes); tokens with a negative slot write nothing to the caches."""
    n_tokens, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    if k.shape != (n_tokens, n_kv_heads, head_dim) or v.shape != k.shape:
        shapes = f"{tuple(k.shape)}, {tuple(v.shape)}"
        raise ValueError(f"k, v must be [{n_tokens}, kv_heads, {head_dim}], got {shapes}")
    if head_dim % 2 or head_dim > 256:
        raise ValueError(f"head_dim must be even and at most 256, got {head_dim}")
    if positions.shape != (n_tokens,) or slot_mapping.shape != (n_tokens,):
        raise ValueError("positions and slot_mapping must be [num_tokens]")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != head_dim or cos.stride() != sin.stride():
        raise ValueError(f"cos, sin must be [max_positions, {head_dim}] with the same strides")
    if k_cache.shape[2:] != (n_kv_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches must be [num_blocks, block_size, {n_kv_heads}, {head_dim}]")
    for name, t in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin), ("k_cache", k_cache),
                    ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride along head_dim")
    if n_tokens == 0:
        return
    half = head_dim // 2
    _rotary_cache_kernel[(n_tokens,)](
        positions, q, k, v, cos, sin, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        n_heads, n_kv_heads, half, k_cache.shape[1],
        HEADS=triton.next_power_of_2(n_heads),
        KV_HEADS=triton.next_power_of_2(n_kv_heads),
        HALF=triton.next_power_of_2(half),
        num_warps=4, **pdl_args(q.device),
    )
