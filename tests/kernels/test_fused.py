"""The small fused kernels (RMSNorm + residual, rotary + KV-cache write, SiLU-and-mul) against the
PyTorch references in kiln.kernels.reference.

Without a GPU they run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py), so the
shapes are small. The interpreter rounds float32 -> bfloat16 toward zero (the GPU rounds to nearest
even), so bf16 results are checked to within a bf16 ulp or two there, and exactly where the GPU would be
exact. The GPU tests at the end run Mistral-7B shapes in bf16.
"""

from __future__ import annotations

import pytest
import torch

from kiln.kernels import reference
from kiln.kernels.activation import silu_and_mul
from kiln.kernels.rmsnorm import rms_norm
from kiln.kernels.rotary import rotary_and_cache_write

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tolerances of one (fp32: a few) rounding in the output dtype; bf16 allows for the interpreter's
# truncation on top of the kernel's float32-vs-half-precision differences.
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


def _assert_exact_on_gpu(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-equal, except bf16 under the interpreter, whose float32 -> bf16 cast truncates."""
    if actual.dtype == torch.bfloat16 and INTERPRETED:
        torch.testing.assert_close(actual, expected, rtol=2**-7, atol=1e-6)
    else:
        assert torch.equal(actual, expected)


# --- RMSNorm ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [100, 576])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype: torch.dtype, hidden: int, with_residual: bool) -> None:
    n = 5
    # x is a column slice of a wider tensor: a row stride that is not `hidden`.
    x = _randn(n, hidden + 12, dtype=dtype, seed=0)[:, 3 : 3 + hidden]
    weight = (1 + 0.5 * _randn(hidden, dtype=torch.float32, seed=1)).to(dtype)
    residual = _randn(n, hidden, dtype=dtype, seed=2) if with_residual else None
    x_before = x.clone()
    want_y, want_s = reference.rms_norm(x, weight, 1e-5, residual.clone() if with_residual else None)

    y, s = rms_norm(x, weight, 1e-5, residual)

    assert y.dtype == want_y.dtype and y.shape == (n, hidden)
    torch.testing.assert_close(y, want_y, **TOL[dtype])
    assert torch.equal(x, x_before)
    if with_residual:
        assert s is residual  # x + residual was written in place
        _assert_exact_on_gpu(s, want_s)
    else:
        assert s is x


def test_rms_norm_residual_in_place_and_out() -> None:
    n, hidden = 3, 80
    x = _randn(n, hidden, dtype=torch.float16, seed=3)
    residual = _randn(n, hidden, dtype=torch.float16, seed=4)
    weight = _randn(hidden, dtype=torch.float16, seed=5)
    # A preallocated out with a row stride of its own.
    out_storage = torch.full((n, hidden + 8), 7.0, dtype=torch.float16, device=DEVICE)
    out = out_storage[:, :hidden]
    want_y, want_s = reference.rms_norm(x, weight, 1e-6, residual.clone())

    y, s = rms_norm(x, weight, 1e-6, residual, out=out)

    assert y is out and s is residual
    assert torch.equal(residual, want_s)
    torch.testing.assert_close(out, want_y, **TOL[torch.float16])
    assert (out_storage[:, hidden:] == 7.0).all()  # nothing past the row


def test_rms_norm_wide_rows_and_fp32_weight() -> None:
    # hidden 5120 (not a power of two, a block of 8192) and an fp32 weight on fp16 activations: the
    # result is fp32, as `weight * h.to(x.dtype)` is in the reference.
    n, hidden = 2, 5120
    x = _randn(n, hidden, dtype=torch.float16, seed=6)
    residual = _randn(n, hidden, dtype=torch.float16, seed=7)
    weight = _randn(hidden, dtype=torch.float32, seed=8)
    want_y, want_s = reference.rms_norm(x, weight, 1e-6, residual.clone())

    y, s = rms_norm(x, weight, 1e-6, residual)

    assert y.dtype == torch.float32
    torch.testing.assert_close(y, want_y, rtol=2e-3, atol=2e-3)
    assert torch.equal(s, want_s)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_quantizes_its_output_for_fp8(dtype: torch.dtype, monkeypatch) -> None:
    """With quantize_fp8 the kernel also quantizes each output row per token, bit-equal to the fp8 layer's
    own quantization of that output, and attaches it: fp8_matmul then runs no quantization kernel and
    gives the same result. Writing the same `out` again without it detaches the stale quantization."""
    from kiln.kernels import fp8_matmul as f8

    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(5, 96, generator=gen) * torch.logspace(-2, 1, 5)[:, None]).to(DEVICE, dtype)
    res = torch.randn(5, 96, generator=gen).to(DEVICE, dtype)
    w = (torch.rand(96, generator=gen) + 0.5).to(DEVICE, dtype)
    out, _ = rms_norm(x, w, 1e-5, res.clone(), quantize_fp8=True)
    xq, sx = out._kiln_fp8
    want_q, want_s = f8.quantize_fp8_per_token(out)
    assert torch.equal(sx, want_s) and torch.equal(xq.view(torch.uint8), want_q.view(torch.uint8))
    weight = (torch.randn(32, 96, generator=gen) * 0.1).to(DEVICE).to(torch.float8_e4m3fn)
    scale = (torch.rand(32, generator=gen) * 0.01).to(DEVICE)
    plain = f8.fp8_matmul(out.clone(), weight, scale)  # a clone carries nothing: quantized here
    calls = []
    monkeypatch.setattr(f8, "quantize_fp8_per_token", lambda *a, **k: calls.append(1))
    fused = f8.fp8_matmul(out, weight, scale)
    assert calls == [] and torch.equal(fused, plain)
    rms_norm(x, w, 1e-5, res.clone(), out=out)
    assert not hasattr(out, "_kiln_fp8")


def test_rms_norm_no_tokens() -> None:
    x = torch.empty(0, 64, device=DEVICE)
    y, s = rms_norm(x, torch.ones(64, device=DEVICE), 1e-6, torch.empty(0, 64, device=DEVICE))
    assert y.shape == (0, 64) and s.shape == (0, 64)


# --- Rotary + KV-cache write --------------------------------------------------------------------------


def _rope_tables(head_dim: int, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(DEVICE), emb.sin().to(DEVICE)


def _check_rotary(
    n: int, heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, seed: int,
    n_padding: int, max_positions: int = 64,
) -> None:
    """Runs the kernel on q, k, v split out of one fused qkv tensor and checks q, the caches, and that
    k, v and the cache slots not written (padding, others) are untouched."""
    g = torch.Generator().manual_seed(seed)
    qkv = _randn(n, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=seed)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(n, heads, head_dim)
    k = k.view(n, kv_heads, head_dim)
    v = v.view(n, kv_heads, head_dim)
    positions = torch.randint(0, max_positions, (n,), generator=g).to(DEVICE)
    num_blocks = (2 * n) // block_size + 2
    # Distinct random slots; the last n_padding tokens are padding (slot -1, position 0).
    slots = torch.randperm(num_blocks * block_size, generator=g)[:n].to(DEVICE)
    slots[n - n_padding :] = -1
    positions[n - n_padding :] = 0
    cos, sin = _rope_tables(head_dim, max_positions)
    # The caches are the middle of larger buffers, so that a write out of bounds (say at slot -1) shows.
    storage_shape = (num_blocks + 2, block_size, kv_heads, head_dim)
    k_storage = _randn(*storage_shape, dtype=dtype, seed=seed + 1)
    v_storage = _randn(*storage_shape, dtype=dtype, seed=seed + 2)
    k_cache, v_cache = k_storage[1:-1], v_storage[1:-1]
    k_storage_before, v_storage_before = k_storage.clone(), v_storage.clone()
    kv_before = qkv[:, heads * head_dim :].clone()
    # The rotation in float32, rounded once: what the kernel computes.
    want_q, want_k = reference.rotary_embedding(positions, q.float(), k.float(), cos, sin)

    rotary_and_cache_write(positions, q, k, v, cos, sin, k_cache, v_cache, slots)

    tol = TOL[dtype]
    torch.testing.assert_close(q, want_q.to(dtype), **tol)
    assert torch.equal(qkv[:, heads * head_dim :], kv_before)  # k and v themselves untouched
    real = slots >= 0
    written = slots[real]
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[written] = False
    k_flat = k_cache.view(-1, kv_heads, head_dim)
    v_flat = v_cache.view(-1, kv_heads, head_dim)
    torch.testing.assert_close(k_flat[written], want_k[real].to(dtype), **tol)
    assert torch.equal(v_flat[written], v[real])
    assert torch.equal(k_flat[untouched], k_storage_before[1:-1].reshape(k_flat.shape)[untouched])
    assert torch.equal(v_flat[untouched], v_storage_before[1:-1].reshape(v_flat.shape)[untouched])
    for storage, before in ((k_storage, k_storage_before), (v_storage, v_storage_before)):
        assert torch.equal(storage[[0, -1]], before[[0, -1]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"),
    [(4, 2, 64, 16), (6, 2, 80, 8), (3, 3, 128, 16)],
)
def test_rotary_and_cache_write(
    dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, block_size: int
) -> None:
    _check_rotary(9, heads, kv_heads, head_dim, block_size, dtype, seed=10 + head_dim, n_padding=2)


def test_rotary_matches_reference_in_half_precision() -> None:
    # The reference run in fp16 itself (cos/sin and products rounded to fp16) stays within an ulp or so.
    n, heads, kv_heads, head_dim = 4, 4, 2, 64
    q = _randn(n, heads, head_dim, dtype=torch.float16, seed=20)
    k = _randn(n, kv_heads, head_dim, dtype=torch.float16, seed=21)
    v = _randn(n, kv_heads, head_dim, dtype=torch.float16, seed=22)
    cos, sin = _rope_tables(head_dim, 32)
    positions = torch.tensor([31, 0, 7, 19], device=DEVICE)
    slots = torch.tensor([5, 0, 12, 9], device=DEVICE)
    k_cache = torch.zeros(2, 8, kv_heads, head_dim, dtype=torch.float16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    want_q, want_k = reference.rotary_embedding(positions, q, k, cos, sin)
    want_k_cache, want_v_cache = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    reference.write_kv_cache(want_k, v, want_k_cache, want_v_cache, slots)

    rotary_and_cache_write(positions, q, k, v, cos, sin, k_cache, v_cache, slots)

    torch.testing.assert_close(q, want_q, rtol=4e-3, atol=4e-3)
    torch.testing.assert_close(k_cache, want_k_cache, rtol=4e-3, atol=4e-3)
    assert torch.equal(v_cache, want_v_cache)


def test_rotary_all_padding_writes_nothing() -> None:
    _check_rotary(3, 2, 1, 64, 8, torch.float32, seed=30, n_padding=3)


# --- SiLU-and-mul ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("d", "block"), [(1, 1024), (100, 1024), (100, 32), (344, 128)])
def test_silu_and_mul_matches_reference(dtype: torch.dtype, d: int, block: int) -> None:
    n = 3
    # A row stride wider than 2 * d, and large gates (silu saturates both ways).
    x = (4 * _randn(n, 2 * d + 5, dtype=torch.float32, seed=d)).to(dtype)[:, : 2 * d]
    want = reference.silu_and_mul(x.float()).to(dtype)

    out = silu_and_mul(x, block=block)

    assert out.dtype == dtype and out.shape == (n, d)
    torch.testing.assert_close(out, want, **TOL[dtype])


def test_silu_and_mul_into_out() -> None:
    x = _randn(4, 2 * 48, dtype=torch.float16, seed=40)
    out_storage = torch.full((4, 64), 3.0, dtype=torch.float16, device=DEVICE)
    out = out_storage[:, 8:56]
    want = reference.silu_and_mul(x)  # in fp16: within an ulp of the fp32 computation

    assert silu_and_mul(x, out=out) is out

    torch.testing.assert_close(out, want, rtol=2e-3, atol=2e-3)
    assert (out_storage[:, :8] == 3.0).all() and (out_storage[:, 56:] == 3.0).all()


# --- GPU: Mistral-7B shapes in bf16 -------------------------------------------------------------------

MISTRAL = {"hidden": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128, "intermediate": 14336}
BF16_TOL = {"rtol": 1.6e-2, "atol": 1e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 7, 2048])
@pytest.mark.parametrize("with_residual", [False, True])
def test_gpu_rms_norm_mistral(n: int, with_residual: bool) -> None:
    hidden = MISTRAL["hidden"]
    x = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16)
    residual = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16) if with_residual else None
    want_y, want_s = reference.rms_norm(x, weight, 1e-5, residual.clone() if with_residual else None)

    y, s = rms_norm(x, weight, 1e-5, residual)

    torch.testing.assert_close(y, want_y, **BF16_TOL)
    assert torch.equal(s, want_s)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 100, 2048])
def test_gpu_rotary_and_cache_write_mistral(n: int) -> None:
    heads, kv_heads, head_dim = MISTRAL["heads"], MISTRAL["kv_heads"], MISTRAL["head_dim"]
    _check_rotary(n, heads, kv_heads, head_dim, 16, torch.bfloat16, seed=50, n_padding=min(n - 1, 3),
                  max_positions=4096)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 7, 2048])
def test_gpu_silu_and_mul_mistral(n: int) -> None:
    x = 3 * torch.randn(n, 2 * MISTRAL["intermediate"], device="cuda", dtype=torch.bfloat16)
    want = reference.silu_and_mul(x.float()).to(torch.bfloat16)

    out = silu_and_mul(x)

    torch.testing.assert_close(out, want, **BF16_TOL)


@pytest.mark.gpu
def test_gpu_kernels_replay_in_a_cuda_graph() -> None:
    # All three captured once, replayed on new inputs: no host sync, no value-dependent launch.
    n, hidden, heads, kv_heads, head_dim = 8, MISTRAL["hidden"], 32, 8, 128
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    x, residual = torch.randn(n, hidden, **bf16), torch.randn(n, hidden, **bf16)
    weight = torch.randn(hidden, **bf16)
    gate_up = torch.randn(n, 2 * 512, **bf16)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, **bf16)
    q, k, v = (t.view(n, -1, head_dim) for t in qkv.split([heads * head_dim, kv_heads * head_dim,
                                                           kv_heads * head_dim], dim=-1))
    cos, sin = _rope_tables(head_dim, 256)
    positions = torch.zeros(n, dtype=torch.int64, device="cuda")
    slots = torch.full((n,), -1, dtype=torch.int64, device="cuda")
    k_cache = torch.zeros(4, 16, kv_heads, head_dim, **bf16)
    v_cache = torch.zeros_like(k_cache)
    y = torch.empty(n, hidden, **bf16)
    act = torch.empty(n, 512, **bf16)

    def step() -> None:
        rms_norm(x, weight, 1e-5, residual, out=y)
        rotary_and_cache_write(positions, q, k, v, cos, sin, k_cache, v_cache, slots)
        silu_and_mul(gate_up, out=act)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    x.copy_(torch.randn_like(x))
    residual.copy_(torch.randn_like(residual))
    gate_up.copy_(torch.randn_like(gate_up))
    qkv.copy_(torch.randn_like(qkv))
    positions.copy_(torch.arange(n, device="cuda") * 17)
    slots.copy_(torch.randperm(64, device="cuda")[:n])
    slots[-1] = -1
    want_y, want_s = reference.rms_norm(x, weight, 1e-5, residual.clone())
    want_q, want_k = reference.rotary_embedding(positions, q.float(), k.float(), cos, sin)
    want_act = reference.silu_and_mul(gate_up.float()).to(torch.bfloat16)
    v_before = v.clone()
    graph.replay()
    torch.cuda.synchronize()

    torch.testing.assert_close(y, want_y, **BF16_TOL)
    assert torch.equal(residual, want_s)
    torch.testing.assert_close(act, want_act, **BF16_TOL)
    torch.testing.assert_close(q, want_q.to(torch.bfloat16), **BF16_TOL)
    real = slots >= 0
    k_flat, v_flat = k_cache.view(-1, kv_heads, head_dim), v_cache.view(-1, kv_heads, head_dim)
    torch.testing.assert_close(k_flat[slots[real]], want_k[real].to(torch.bfloat16), **BF16_TOL)
    assert torch.equal(v_flat[slots[real]], v_before[real])
    assert int((k_flat.float().abs().sum((1, 2)) != 0).sum()) == int(real.sum())
