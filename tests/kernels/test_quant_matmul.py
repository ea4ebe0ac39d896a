"""Quantized matmul kernels (int4 / int8 weight-only, fp8 W8A8) against kiln.kernels.reference.

Weights come from kiln.quant.formats' quantizers on random weights (int4 zero points re-drawn at random
0..15, so every nibble - zero combination occurs). Without a GPU the kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py): small shapes, fp16 activations and scales, since the
interpreter's bf16 tl.dot is wrong and its fp32 -> bf16 cast truncates. Shapes are chosen for the
edges: N not a multiple of BLOCK_N, K not a multiple of the K step (per channel), K steps that span
several groups (scales gathered per element) or lie in one (scales per row), split-K on and off, several
blocks of rows in the GEMV, strided and misaligned inputs. The GPU tests at the end run Mistral-7B's
shapes in bf16 through every path.
"""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import int4_matmul as int4_module
from kiln.kernels import int8_matmul as int8_module
from kiln.kernels import reference, split_counters
from kiln.kernels.fp8_matmul import fp8_gemv, fp8_matmul, quantize_fp8_per_token
from kiln.kernels.int4_matmul import dequantize_int4, int4_gemm, int4_gemv, int4_matmul
from kiln.kernels.int8_matmul import dequantize_int8, int8_gemm, int8_gemv, int8_matmul
from kiln.quant.formats import (
    FP8_MAX,
    dequantize_int,
    fake_quantize_fp8_per_token,
    quantize_asymmetric_int4,
    quantize_fp8,
    quantize_symmetric,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"

# (group_size, N, K): group_size 0 is per channel. N is never a multiple of the 32-row tiles used
# below; K = 200 is not a multiple of the 64-column K step.
CASES = [(32, 48, 128), (64, 40, 256), (128, 72, 256), (0, 36, 200)]
CASE_IDS = ["g32", "g64", "g128", "per-channel"]
SMALL = {"block_n": 32, "block_k": 64}  # GEMV tiles small enough that the test shapes hold several
GEMM = {"block_m": 16, "block_n": 32, "block_k": 64}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(m: int, k: int, dtype: torch.dtype = torch.float16, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=_gen(seed)).to(dtype=dtype, device=DEVICE)


def _int4(n: int, k: int, group: int, scale_dtype=torch.float16, symmetric=False, seed=0) -> dict:
    g = _gen(seed)
    w = 0.05 * torch.randn(n, k, generator=g)
    if symmetric:  # int4_wo: zero point 8
        parts = quantize_symmetric(w, 4, group, scale_dtype)
    else:  # int4_awq's format, with zero points drawn at random
        parts = quantize_asymmetric_int4(w, group, scale_dtype=scale_dtype)
        parts["zeros"] = torch.randint(0, 16, parts["zeros"].shape, generator=g).to(torch.uint8)
    return {name: t.to(DEVICE) for name, t in parts.items()}


def _int8(n: int, k: int, group: int, scale_dtype=torch.float16, seed=0) -> dict:
    w = 0.05 * torch.randn(n, k, generator=_gen(seed))
    return {name: t.to(DEVICE) for name, t in quantize_symmetric(w, 8, group, scale_dtype).items()}


def _fp8(n: int, k: int, seed: int = 0) -> dict:
    return {name: t.to(DEVICE) for name, t in quantize_fp8(torch.randn(n, k, generator=_gen(seed))).items()}


def _ref_int4(x: torch.Tensor, p: dict) -> torch.Tensor:
    return reference.linear_int(x, p["qweight"], p["scales"], p["zeros"])


def _ref_int8(x: torch.Tensor, p: dict) -> torch.Tensor:
    return reference.linear_int(x, p["qweight"], p["scales"])


def _spy(monkeypatch: pytest.MonkeyPatch, module, names: list[str]) -> list[str]:
    """Record which of the module's functions its dispatcher calls."""
    called: list[str] = []
    for name in names:
        def wrapper(*args, _fn=getattr(module, name), _name=name, **kwargs):
            called.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
    return called


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Within a couple of output roundings: both sides round the same fp32-accumulated dot to fp16/bf16,
    so they differ by about one ulp (bf16 in the interpreter: its cast truncates, one more). A wrong
    group, zero point, nibble or row is off by a sizable fraction of the output's scale."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    ulp = 2**-7 if out.dtype == torch.bfloat16 else 2**-10
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * ulp, atol=2 * ulp * scale)


# --- int4 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group, n, k", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("block_k", [32, 256])  # steps inside one group, and spanning several
def test_dequantize_int4_equals_formats(group: int, n: int, k: int, block_k: int) -> None:
    p = _int4(n, k, group)
    args = (p["qweight"], p["scales"], p["zeros"], group, torch.float16)
    got = dequantize_int4(*args, block_n=16, block_k=block_k)
    assert torch.equal(got, dequantize_int(p, torch.float16))


def test_dequantize_int4_bf16() -> None:
    p = _int4(40, 256, 64, scale_dtype=torch.bfloat16)
    got = dequantize_int4(p["qweight"], p["scales"], p["zeros"], 64, torch.bfloat16)
    want = dequantize_int(p, torch.bfloat16)
    if INTERPRETED:  # the interpreter's fp32 -> bf16 cast truncates
        torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("group, n, k", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("split_k", [1, 3])
def test_int4_gemv(group: int, n: int, k: int, m: int, split_k: int) -> None:
    p, x = _int4(n, k, group), _x(m, k)
    out = int4_gemv(x, p["qweight"], p["scales"], p["zeros"], group, split_k=split_k, **SMALL)
    assert_matches(out, _ref_int4(x, p))


@pytest.mark.parametrize("group, n, k", CASES + [(32, 24, 160)], ids=CASE_IDS + ["g32-partial-step"])
@pytest.mark.parametrize("split_k", [2, None])
@pytest.mark.parametrize("chunk_words, prefetch", [(4, 0), (16, 0), (16, 1)])
def test_int4_gemv1_single_row(group: int, n: int, k: int, split_k: int | None, chunk_words: int,
                               prefetch: int) -> None:
    """The word-wise M = 1 kernel (1 + q/16 floats, zero and scale applied per group), N not a multiple
    of the tile, splits in whole groups: steps inside a group, steps of several groups (chunk_words 16
    with groups of 4 or 8 words, the last step partly past K), a per-channel group of 25 words (chunks
    of one word)."""
    p, x = _int4(n, k, group, scale_dtype=torch.float16), _x(1, k, torch.float16)
    out = int4_module.int4_gemv1(x, p["qweight"], p["scales"], p["zeros"], group, split_k=split_k,
                                 block_n=16, chunk_words=chunk_words, prefetch=prefetch)
    assert_matches(out, _ref_int4(x, p))


def test_int4_gemv1_reduces_its_splits_in_place() -> None:
    """Split K, summed by the last split of each output element: the same bits on every call, written
    into a strided `out`, and the shared arrival counters are all back at zero afterwards."""
    p, x = _int4(40, 256, 32), _x(1, 256)
    out = torch.zeros(40, 2, dtype=x.dtype, device=DEVICE)[:, 0]  # stride 2
    first = int4_module.int4_gemv1(x, p["qweight"], p["scales"], p["zeros"], 32, out=out, split_k=4,
                                   block_n=16, chunk_words=4)
    assert first.data_ptr() == out.data_ptr()
    assert_matches(out, _ref_int4(x, p)[0])
    again = int4_module.int4_gemv1(x, p["qweight"], p["scales"], p["zeros"], 32, split_k=4, block_n=16,
                                   chunk_words=4)
    assert torch.equal(again[0], out)
    assert int(split_counters(x.device, 40).abs().sum()) == 0


def test_int4_gemv1_rejects_a_chunk_that_is_not_a_power_of_two() -> None:
    p, x = _int4(16, 128, 32), _x(1, 128)
    with pytest.raises(ValueError, match="chunk_words"):
        int4_module.int4_gemv1(x, p["qweight"], p["scales"], p["zeros"], 32, chunk_words=12)


def test_int4_gemv1_bf16() -> None:
    p, x = _int4(40, 256, 64, scale_dtype=torch.bfloat16), _x(1, 256, torch.bfloat16)
    out = int4_module.int4_gemv1(x, p["qweight"], p["scales"], p["zeros"], 64, split_k=1, block_n=16)
    assert_matches(out, _ref_int4(x, p))


def test_int4_matmul_single_row_takes_gemv1(monkeypatch) -> None:
    called = _spy(monkeypatch, int4_module, ["int4_gemv1", "int4_gemv"])
    p, x = _int4(40, 128, 32), _x(1, 128)
    int4_matmul(x, p["qweight"], p["scales"], p["zeros"], 32)
    assert called == ["int4_gemv1"]
    called.clear()
    int4_matmul(x, p["qweight"], p["scales"], p["zeros"], 32, use_gemv1=False)
    assert called == ["int4_gemv"]
    called.clear()
    odd = p["qweight"].new_empty(40, 64 + 1)[:, 1:]  # a misaligned view: the general GEMV takes it
    odd.copy_(p["qweight"])
    assert_matches(int4_matmul(x, odd, p["scales"], p["zeros"], 32), _ref_int4(x, p))
    assert called == ["int4_gemv"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk_words, split_k", [(4, 2), (16, None)])
def test_int4_gemv1_gated_reads_silu_gate_times_up(dtype: torch.dtype, chunk_words: int, split_k: int | None) -> None:
    """The down projection reading gate_up's output: the same bits as SiLU-and-mul's kernel, then the GEMV."""
    from kiln.kernels.activation import silu_and_mul

    p, h = _int4(40, 256, 32, scale_dtype=dtype), 2 * _x(1, 512, dtype)
    kw = dict(split_k=split_k, block_n=16, chunk_words=chunk_words)
    got = int4_module.int4_gemv1(h, p["qweight"], p["scales"], p["zeros"], 32, gated=True, **kw)
    act = silu_and_mul(h)
    assert torch.equal(got, int4_module.int4_gemv1(act, p["qweight"], p["scales"], p["zeros"], 32, **kw))
    assert_matches(got, _ref_int4(act, p))


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_int4_matmul_gated_on_every_path(m: int, strided: bool) -> None:
    """One row (fused), a few rows (GEMV) and more (GEMM) take a gated x; a strided x, which the fused
    kernel cannot read, goes through SiLU-and-mul first."""
    from kiln.kernels.activation import silu_and_mul

    p, h = _int4(40, 128, 32), _x(m, 512 if strided else 256)
    if strided:
        h = h[:, ::2]
    got = int4_matmul(h, p["qweight"], p["scales"], p["zeros"], 32, gated=True, gemv_max_m=4)
    assert got.shape == (m, 40)
    assert_matches(got, _ref_int4(silu_and_mul(h.contiguous()), p))


def test_int4_matmul_gated_unfused_gives_the_same_bits(monkeypatch) -> None:
    """KILN_FUSE_GATE=0: SiLU-and-mul's kernel, then the same one-row GEMV."""
    p, h = _int4(40, 256, 32), _x(1, 512)
    fused = int4_matmul(h, p["qweight"], p["scales"], p["zeros"], 32, gated=True)
    monkeypatch.setattr(int4_module, "FUSE_GATE", False)
    called = _spy(monkeypatch, int4_module, ["silu_and_mul", "int4_gemv1"])
    unfused = int4_matmul(h, p["qweight"], p["scales"], p["zeros"], 32, gated=True)
    assert called == ["silu_and_mul", "int4_gemv1"]
    assert torch.equal(fused, unfused)


def test_int4_gemv1_gated_names_the_width_it_needs() -> None:
    p, h = _int4(16, 128, 32), _x(1, 128)
    with pytest.raises(ValueError, match="gated x holds gate and up: last dimension 256, got 128"):
        int4_module.int4_gemv1(h, p["qweight"], p["scales"], p["zeros"], 32, gated=True)


@pytest.mark.parametrize("m", [17, 40])
def test_int4_gemv_several_row_blocks(m: int) -> None:
    """More rows than one program holds (block_m 8): the weight is re-read per block of rows."""
    p, x = _int4(40, 128, 64), _x(m, 128)
    out = int4_gemv(x, p["qweight"], p["scales"], p["zeros"], 64, split_k=2, **SMALL)
    assert_matches(out, _ref_int4(x, p))


@pytest.mark.parametrize("group, n, k", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("m", [1, 17, 40])
@pytest.mark.parametrize("split_k", [1, None])  # None: these few tiles leave the heuristic splitting K
def test_int4_gemm(group: int, n: int, k: int, m: int, split_k: int | None) -> None:
    # block_k 64 = 32 pairs: one group per step at G >= 64, a gather of two groups per step at G = 32.
    p, x = _int4(n, k, group), _x(m, k)
    out = int4_gemm(x, p["qweight"], p["scales"], p["zeros"], group, split_k=split_k, **GEMM)
    assert_matches(out, _ref_int4(x, p))


def test_int4_symmetric_format() -> None:
    """int4_wo: quantize_symmetric's zero point 8, through both paths."""
    p, x = _int4(40, 256, 128, symmetric=True), _x(5, 256)
    ref = _ref_int4(x, p)
    assert_matches(int4_gemv(x, p["qweight"], p["scales"], p["zeros"], 128, **SMALL), ref)
    assert_matches(int4_gemm(x, p["qweight"], p["scales"], p["zeros"], 128, **GEMM), ref)


def test_int4_gemv_bf16() -> None:
    p, x = _int4(40, 128, 32, scale_dtype=torch.bfloat16), _x(3, 128, torch.bfloat16)
    out = int4_gemv(x, p["qweight"], p["scales"], p["zeros"], 32, split_k=2, **SMALL)
    assert_matches(out, _ref_int4(x, p))


@pytest.mark.parametrize("m, path", [(2, "int4_gemv"), (17, "int4_gemm"), (40, "dequantize_int4")])
def test_int4_matmul_dispatch_leading_dims_and_out(m: int, path: str, monkeypatch) -> None:
    called = _spy(monkeypatch, int4_module, ["int4_gemv", "int4_gemm", "dequantize_int4"])
    p = _int4(40, 128, 64)
    x = _x(2 * m, 128).view(2, m, 128)  # M = 2m rows: 4, 34, 80
    ref = _ref_int4(x, p)
    out = int4_matmul(x, p["qweight"], p["scales"], p["zeros"], 64, dequant_min_m=64)
    assert_matches(out, ref)
    buf = torch.zeros(2, m, 40, dtype=torch.float16, device=DEVICE)
    res = int4_matmul(x, p["qweight"], p["scales"], p["zeros"], 64, out=buf, gemv_max_m=4, dequant_min_m=80)
    assert res is buf
    assert_matches(buf, ref)
    assert called == [path, path]


def test_int4_strided_and_misaligned_inputs() -> None:
    """Views into wider tensors: x at an odd element offset (not word aligned: copied), the weight,
    scales, zeros and out with row strides of their own."""
    n, k, group = 40, 128, 32
    p = _int4(n, k, group)
    q = torch.zeros(n, k // 2 + 16, dtype=torch.uint8, device=DEVICE)[:, 8 : 8 + k // 2]
    s = torch.zeros(n, 7, dtype=torch.float16, device=DEVICE)[:, 2:6]
    z = torch.zeros(n, 9, dtype=torch.uint8, device=DEVICE)[:, 1:5]
    q.copy_(p["qweight"])
    s.copy_(p["scales"])
    z.copy_(p["zeros"])
    ref_deq = dequantize_int(p, torch.float16)
    assert torch.equal(dequantize_int4(q, s, z, group, torch.float16, block_n=16, block_k=64), ref_deq)
    for m, fn, cfg in [(3, int4_gemv, {**SMALL, "split_k": 2}), (3, int4_gemv, SMALL), (17, int4_gemm, GEMM)]:
        x = _x(m, k + 3)[:, 1 : 1 + k]
        out = torch.zeros(m, n + 8, dtype=torch.float16, device=DEVICE)[:, 4 : 4 + n]
        fn(x, q, s, z, group, out=out, **cfg)
        assert_matches(out, _ref_int4(x, p))


def test_int4_rejects_bad_shapes() -> None:
    p, x = _int4(40, 128, 64), _x(2, 128)
    with pytest.raises(ValueError):
        int4_gemv(x, p["qweight"], p["scales"], p["zeros"], 32)  # 4 groups of 32 != 2 scales per row
    with pytest.raises(ValueError):
        int4_gemv(_x(2, 64), p["qweight"], p["scales"], p["zeros"], 64)
    with pytest.raises(ValueError):
        int4_gemm(x.float(), p["qweight"], p["scales"], p["zeros"], 64)


# --- int8 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group, n, k", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("block_k", [32, 256])
def test_dequantize_int8_equals_formats(group: int, n: int, k: int, block_k: int) -> None:
    p = _int8(n, k, group)
    got = dequantize_int8(p["qweight"], p["scales"], group, torch.float16, block_n=16, block_k=block_k)
    assert torch.equal(got, dequantize_int(p, torch.float16))


@pytest.mark.parametrize("group, n, k", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("split_k", [1, 3])
def test_int8_gemv(group: int, n: int, k: int, m: int, split_k: int) -> None:
    p, x = _int8(n, k, group), _x(m, k)
    out = int8_gemv(x, p["qweight"], p["scales"], group, split_k=split_k, **SMALL)
    assert_matches(out, _ref_int8(x, p))


@pytest.mark.parametrize("m", [17, 40])
def test_int8_gemv_several_row_blocks(m: int) -> None:
    p, x = _int8(40, 128, 0), _x(m, 128)
    assert_matches(int8_gemv(x, p["qweight"], p["scales"], 0, split_k=2, **SMALL), _ref_int8(x, p))


@pytest.mark.parametrize("group, n, k", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("m", [1, 17, 40])
@pytest.mark.parametrize("split_k", [1, None])
def test_int8_gemm(group: int, n: int, k: int, m: int, split_k: int | None) -> None:
    p, x = _int8(n, k, group), _x(m, k)
    assert_matches(int8_gemm(x, p["qweight"], p["scales"], group, split_k=split_k, **GEMM), _ref_int8(x, p))


@pytest.mark.parametrize("m, path", [(2, "int8_gemv"), (17, "int8_gemm"), (40, "dequantize_int8")])
def test_int8_matmul_dispatch_and_strided_inputs(m: int, path: str, monkeypatch) -> None:
    called = _spy(monkeypatch, int8_module, ["int8_gemv", "int8_gemm", "dequantize_int8"])
    n, k, group = 40, 128, 32
    p = _int8(n, k, group)
    q = torch.zeros(n, k + 16, dtype=torch.int8, device=DEVICE)[:, 16:]
    q.copy_(p["qweight"])
    scales = p["scales"].t().contiguous().t()  # column-major scales
    x = _x(m, 2 * k)[:, ::2]  # column stride 2
    out = torch.zeros(m, n + 3, dtype=torch.float16, device=DEVICE)[:, :n]
    res = int8_matmul(x, q, scales, group, out=out, dequant_min_m=32)
    assert res is out
    assert_matches(out, _ref_int8(x, p))
    assert called == [path]


def test_int8_gemv_bf16() -> None:
    p, x = _int8(40, 128, 64, scale_dtype=torch.bfloat16), _x(3, 128, torch.bfloat16)
    assert_matches(int8_gemv(x, p["qweight"], p["scales"], 64, split_k=2, **SMALL), _ref_int8(x, p))


# --- fp8 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("one_pass_max_m", [8, 0], ids=["one-pass", "two-pass"])
def test_quantize_fp8_per_token_is_bit_exact(dtype: torch.dtype, one_pass_max_m: int) -> None:
    # Rows from 1e-6 to 100 in scale, a zero row (scale clamps to 1e-12 / 448) and a tiny outlier.
    x = torch.randn(7, 300, generator=_gen(3)) * torch.logspace(-6, 2, 7)[:, None]
    x[3] = 0.0
    x[2, 5] = 1e-9
    x = x.to(dtype=dtype, device=DEVICE)
    xq, scale = quantize_fp8_per_token(x, block_k=128, one_pass_max_m=one_pass_max_m)
    # The reference on the CPU: PyTorch's CUDA `tensor / scalar` multiplies by the rounded reciprocal,
    # which is not IEEE division; the kernel divides exactly, as the CPU does.
    x, xq, scale = x.cpu(), xq.cpu(), scale.cpu()
    want_scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    assert xq.dtype == torch.float8_e4m3fn and xq.shape == x.shape and scale.shape == (7, 1)
    assert torch.equal(scale, want_scale)
    assert torch.equal(xq.float(), (x.float() / want_scale).to(torch.float8_e4m3fn).float())
    assert torch.equal((xq.float() * scale).to(dtype), fake_quantize_fp8_per_token(x))


def test_quantize_fp8_rounds_to_nearest_even() -> None:
    """A row led by 448 has scale 1, so the row itself is rounded: every e4m3 value, every midpoint
    between neighbours (ties go to the even code), just off the midpoints, subnormals, random values."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    grid = codes[~codes.isnan()].unique()  # sorted, +-448 included
    mid = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, mid, mid.nextafter(grid[1:]), mid.nextafter(grid[:-1]),
                        torch.rand(2000, generator=_gen(4)) * 896 - 448,
                        torch.rand(500, generator=_gen(5)) * 0.04 - 0.02])
    x = torch.cat([torch.tensor([448.0]), values])[None].to(DEVICE)
    xq, scale = quantize_fp8_per_token(x)
    assert scale.item() == 1.0
    assert torch.equal(xq.float(), x.to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("m", [1, 3, 17, 40])
@pytest.mark.parametrize("split_k", [1, 2])
def test_fp8_gemv(m: int, split_k: int) -> None:
    p, x = _fp8(72, 256), _x(m, 256)
    out = fp8_gemv(x, p["weight"], p["weight_scale"], split_k=split_k, **SMALL)
    assert_matches(out, reference.linear_fp8(x, p["weight"], p["weight_scale"]))


def test_fp8_matmul_leading_dims() -> None:
    """On the CPU fp8_matmul runs the quantize kernel and fp8_gemv (no _scaled_mm); on the GPU this
    shape (N = 40, not a multiple of 16) takes the same path."""
    p = _fp8(40, 96)
    x = _x(2 * 5, 96).view(2, 5, 96)
    out = fp8_matmul(x, p["weight"], p["weight_scale"])
    assert out.shape == (2, 5, 40)
    assert_matches(out, reference.linear_fp8(x, p["weight"], p["weight_scale"]))


# ---- GPU, Mistral-7B shapes, bf16 ------------------------------------------------------------------

gpu = pytest.mark.gpu
# (N, K): fused qkv, o_proj, fused gate_up, down_proj
MISTRAL = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
MISTRAL_IDS = ["qkv", "o", "gate_up", "down"]
ROWS = [1, 4, 16, 128, 2048]
GEMV_MAX_ROWS = 16


def _gpu_weight(kind: str, n: int, k: int, group: int) -> dict:
    w = 0.02 * torch.randn(n, k, generator=torch.Generator(DEVICE).manual_seed(n + k), device=DEVICE)
    if kind == "int4":
        parts = quantize_asymmetric_int4(w, group, scale_dtype=torch.bfloat16)
        parts["zeros"] = torch.randint(0, 16, parts["zeros"].shape, device=DEVICE).to(torch.uint8)
        return parts
    if kind == "int8":
        return quantize_symmetric(w, 8, group, torch.bfloat16)
    return quantize_fp8(w)


def _gpu_x(m: int, k: int) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator(DEVICE).manual_seed(m), device=DEVICE)
    return x.to(torch.bfloat16)


@gpu
@pytest.mark.parametrize("shape", MISTRAL, ids=MISTRAL_IDS)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("group", [128, 0])
def test_gpu_int4_mistral(shape, m, group):
    n, k = shape
    p = _gpu_weight("int4", n, k, group)
    x = _gpu_x(m, k)
    ref = _ref_int4(x, p)
    args = (p["qweight"], p["scales"], p["zeros"], group)
    if m <= GEMV_MAX_ROWS:
        assert_matches(int4_gemv(x, *args), ref)
        assert_matches(int4_gemv(x, *args, split_k=1), ref)
    assert_matches(int4_gemm(x, *args), ref)
    assert_matches(int4_gemm(x, *args, block_m=16, split_k=1), ref)
    assert_matches(int4_matmul(x, *args, dequant_min_m=1), ref)  # dequantize_int4 + cuBLAS
    assert torch.equal(dequantize_int4(*args, torch.bfloat16), dequantize_int(p, torch.bfloat16))


@gpu
@pytest.mark.parametrize("shape", MISTRAL, ids=MISTRAL_IDS)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("group", [0, 128])
def test_gpu_int8_mistral(shape, m, group):
    n, k = shape
    p = _gpu_weight("int8", n, k, group)
    x = _gpu_x(m, k)
    ref = _ref_int8(x, p)
    args = (p["qweight"], p["scales"], group)
    if m <= GEMV_MAX_ROWS:
        assert_matches(int8_gemv(x, *args), ref)
        assert_matches(int8_gemv(x, *args, split_k=1), ref)
    assert_matches(int8_gemm(x, *args), ref)
    assert_matches(int8_gemm(x, *args, block_m=16, split_k=1), ref)
    assert_matches(int8_matmul(x, *args, dequant_min_m=1), ref)
    assert torch.equal(dequantize_int8(*args, torch.bfloat16), dequantize_int(p, torch.bfloat16))


@gpu
@pytest.mark.parametrize("shape", MISTRAL, ids=MISTRAL_IDS)
@pytest.mark.parametrize("m", ROWS)
def test_gpu_fp8_mistral(shape, m):
    n, k = shape
    p = _gpu_weight("fp8", n, k, 0)
    x = _gpu_x(m, k)
    ref = reference.linear_fp8(x, p["weight"], p["weight_scale"])
    xq, scale = quantize_fp8_per_token(x)
    want_scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    # CUDA torch divides by a constant through its reciprocal (1 ulp off); the kernel divides exactly.
    torch.testing.assert_close(scale, want_scale, rtol=2.5e-7, atol=0)
    assert torch.equal(xq.float(), (x.float() / scale).to(torch.float8_e4m3fn).float())
    assert_matches(fp8_matmul(x, p["weight"], p["weight_scale"]), ref)  # _scaled_mm
    if m <= GEMV_MAX_ROWS:
        assert_matches(fp8_gemv(x, p["weight"], p["weight_scale"]), ref)
        assert_matches(fp8_gemv(x, p["weight"], p["weight_scale"], split_k=1), ref)


@gpu
def test_gpu_fp8_matmul_fp16_output():
    """_scaled_mm's row-wise scaling in older PyTorch gives bf16 only; fp8_matmul must still serve fp16."""
    p = _gpu_weight("fp8", 4096, 4096, 0)
    x = _gpu_x(64, 4096).half()
    out = fp8_matmul(x, p["weight"], p["weight_scale"])
    # The reference on the CPU: CUDA torch divides by the activation scale through its reciprocal, which
    # moves a few activations across an e4m3 rounding boundary (a 1/16 step) against the exact division.
    ref = reference.linear_fp8(x.cpu(), p["weight"].cpu(), p["weight_scale"].cpu())
    assert_matches(out.cpu(), ref)


@gpu
@pytest.mark.parametrize("kind", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("m", [1, 4, 64])
def test_gpu_cuda_graph_replay(kind, m):
    """Captured once (split-K workspace included), replayed on new activations."""
    n, k, group = 4096, 4096, 128
    p = _gpu_weight(kind, n, k, group)
    if kind == "int4":
        fn = lambda x: int4_matmul(x, p["qweight"], p["scales"], p["zeros"], group)  # noqa: E731
        ref = lambda x: _ref_int4(x, p)  # noqa: E731
    elif kind == "int8":
        fn = lambda x: int8_matmul(x, p["qweight"], p["scales"], group)  # noqa: E731
        ref = lambda x: _ref_int8(x, p)  # noqa: E731
    else:
        fn = lambda x: fp8_matmul(x, p["weight"], p["weight_scale"], gemv_max_m=4)  # noqa: E731
        ref = lambda x: reference.linear_fp8(x, p["weight"], p["weight_scale"])  # noqa: E731
    x = _gpu_x(m, k)
    fn(x)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x)
    for seed in (5, 6):
        x.copy_(torch.randn(m, k, generator=torch.Generator(DEVICE).manual_seed(seed), device=DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(out, ref(x))
