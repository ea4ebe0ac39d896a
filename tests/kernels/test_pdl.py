"""Programmatic dependent launch (kernels/pdl.py): every kernel waits before it touches memory, and a
chain of dependent kernels replayed from a CUDA graph (where they overlap) gives bit for bit what the
same kernels give one at a time."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

from kiln.errors import KilnError
from kiln.kernels import (
    activation,
    decode_attention,
    fp8_matmul,
    int4_matmul,
    int8_matmul,
    pdl,
    prefill_attention,
    rmsnorm,
    rotary,
)

MODULES = [activation, decode_attention, fp8_matmul, int4_matmul, int8_matmul, prefill_attention, rmsnorm,
           rotary]
MEMORY_OPS = {"load", "store", "atomic_add", "atomic_cas", "atomic_xchg", "atomic_max", "atomic_min"}


def _kernels(module) -> list[ast.FunctionDef]:
    tree = ast.parse(inspect.getsource(module))
    return [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.endswith("_kernel")
            and any("jit" in ast.unparse(d) for d in f.decorator_list)]


def _first_line(fn: ast.FunctionDef, pred) -> int | None:
    lines = [n.lineno for n in ast.walk(fn) if isinstance(n, ast.Call) and pred(n)]
    return min(lines) if lines else None


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_kernel_waits_for_the_one_before_it_touches_memory(module) -> None:
    kernels = _kernels(module)
    assert kernels, f"no Triton kernel found in {module.__name__}"
    for fn in kernels:
        assert "USE_PDL" in [a.arg for a in fn.args.args], f"{fn.name} takes no USE_PDL"
        sync = _first_line(fn, lambda c: ast.unparse(c.func) == "grid_dependency_sync")
        assert sync is not None, f"{fn.name} never calls grid_dependency_sync"
        memory = _first_line(fn, lambda c: isinstance(c.func, ast.Attribute) and c.func.attr in MEMORY_OPS)
        assert memory is None or memory > sync, f"{fn.name} reads or writes memory before its wait"


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_launch_passes_the_pdl_arguments(module) -> None:
    source = inspect.getsource(module)
    names = {fn.name for fn in _kernels(module)}
    tree = ast.parse(source)
    launched = set()
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        if isinstance(call.func, ast.Subscript) and ast.unparse(call.func.value) in names:
            launched.add(ast.unparse(call.func.value))
            assert any(k.arg is None and "pdl_args" in ast.unparse(k.value) for k in call.keywords), \
                f"{ast.unparse(call.func.value)} is launched without **pdl_args(...)"
    assert launched == names


def test_off_the_gpu_no_kernel_asks_for_pdl(monkeypatch) -> None:
    monkeypatch.setenv("KILN_PDL", "1")
    assert pdl.pdl_args(torch.device("cpu")) == {"USE_PDL": 0}
    assert pdl.state("cpu") == "off"


@pytest.mark.parametrize(("value", "mode"), [(None, 1), ("0", 0), ("1", 1), ("late", 2)])
def test_kiln_pdl_setting(monkeypatch, value: str | None, mode: int) -> None:
    """On by default (measured faster on an H100); 0 turns it off; late moves the long kernels' signal."""
    if value is None:
        monkeypatch.delenv("KILN_PDL", raising=False)
    else:
        monkeypatch.setenv("KILN_PDL", value)
    assert pdl.mode() == mode
    assert pdl.requested() is (mode > 0)


def test_a_bad_kiln_pdl_value_names_the_setting_and_its_values(monkeypatch) -> None:
    monkeypatch.setenv("KILN_PDL", "yes")
    with pytest.raises(KilnError, match=r"KILN_PDL='yes' is not 1 .*, late .* or 0"):
        pdl.requested()


LATE = {decode_attention: ["_decode_kernel"], fp8_matmul: ["_fp8_gemv_kernel"],
        int4_matmul: ["_int4_gemv_kernel", "_int4_gemv1_kernel"], int8_matmul: ["_int8_gemv_kernel"]}


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_kernels_launched_late_signal_after_their_main_loop(module) -> None:
    """A launch with late=True gives USE_PDL 2, where grid_dependency_sync does not signal: the kernel
    must then call launch_dependents itself (else the next kernel waits for its exit, which is correct
    but loses the overlap), after its loops; and only those kernels may."""
    tree = ast.parse(inspect.getsource(module))
    late = set()
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        if isinstance(call.func, ast.Subscript):
            if any(k.arg is None and "late=True" in ast.unparse(k.value) for k in call.keywords):
                late.add(ast.unparse(call.func.value))
    assert sorted(late) == sorted(LATE.get(module, []))
    for fn in _kernels(module):
        signal = _first_line(fn, lambda c: ast.unparse(c.func) == "launch_dependents")
        assert (signal is not None) == (fn.name in late), f"{fn.name}: launch_dependents vs late=True"
        if signal is not None:
            # the main loop: the first loop after the wait, or the helper called there that holds it
            sync = _first_line(fn, lambda c: ast.unparse(c.func) == "grid_dependency_sync")
            work = [n for n in ast.walk(fn) if getattr(n, "lineno", 0) > sync and (
                isinstance(n, ast.For) or (isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                                           and n.func.id not in ("launch_dependents", "range")))]
            main = min(work, key=lambda n: n.lineno)
            assert signal > main.end_lineno, f"{fn.name} signals before its main loop (line {main.lineno}) ends"


# ---- on the GPU ----

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def _step(kind: str, i: int, p: dict, norm_w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """rms_norm, then a one-row GEMV: each kernel reads what the one before wrote."""
    h, _ = rmsnorm.rms_norm(h, norm_w, 1e-5, quantize_fp8=kind == "fp8" and i % 2 == 0)
    if kind == "int4":
        return int4_matmul.int4_gemv1(h, p["qweight"], p["scales"], p["zeros"], 128, split_k=4 + i % 2,
                                      warm=i % 3)
    return fp8_matmul.fp8_gemv(h, p["weight"], p["weight_scale"], split_k=4 + i % 2, warm=i % 3)


def _chain(kind: str, weights: list[dict], norm_w: torch.Tensor, h: torch.Tensor, serial: bool = False):
    for i, p in enumerate(weights):
        h = _step(kind, i, p, norm_w, h)
        if serial:  # the host waits for each step before launching the next: nothing overlaps
            torch.cuda.synchronize()
    return h


@gpu
@needs_gpu
@pytest.mark.parametrize("setting", ["1", "late"])
@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_gpu_overlapped_chain_equals_one_kernel_at_a_time(kind: str, setting: str, monkeypatch, request) -> None:
    from kiln.quant.formats import quantize_asymmetric_int4, quantize_fp8

    monkeypatch.setenv("KILN_PDL", setting)
    pdl._enabled.cache_clear()
    request.addfinalizer(pdl._enabled.cache_clear)  # the next test reads KILN_PDL afresh
    if not pdl.pdl_args(torch.device("cuda"))["USE_PDL"]:
        pytest.skip("this GPU or Triton has no programmatic dependent launch")

    dev = "cuda"
    gen = torch.Generator(dev).manual_seed(0)
    n = 4096
    weights = []
    for _ in range(12):
        w = 0.02 * torch.randn(n, n, generator=gen, device=dev)
        weights.append(quantize_asymmetric_int4(w, 128, scale_dtype=torch.bfloat16) if kind == "int4"
                       else quantize_fp8(w))
    norm_w = (1 + 0.1 * torch.randn(n, generator=gen, device=dev)).to(torch.bfloat16)
    x = torch.randn(1, n, generator=gen, device=dev).to(torch.bfloat16)

    _chain(kind, weights, norm_w, x)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(kind, weights, norm_w, x)
    monkeypatch.setenv("KILN_PDL", "0")  # the reference: the same kernels, none launched early
    pdl._enabled.cache_clear()
    for seed in range(5):
        x.copy_(torch.randn(1, n, generator=torch.Generator(dev).manual_seed(seed), device=dev))
        graph.replay()
        torch.cuda.synchronize()
        want = _chain(kind, weights, norm_w, x, serial=True)
        assert torch.equal(out, want), f"replay {seed} differs from the serial chain without PDL"
