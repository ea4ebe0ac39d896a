"""Kernel choices measured on this GPU for this engine's shapes ("the engine is tailored to your GPU").

`kiln build` on a GPU times, for each distinct quantized linear layer of the model (its format, N, K and
group), a small grid of GEMV configurations at one row, then where the GEMV stops beating the tiled
GEMM as rows grow (the decode batch sizes), and from which row count dequantize-then-cuBLAS beats the
tiled GEMM (prefill). fp8 layers compare kiln's Triton GEMV with torch._scaled_mm at small row counts.
The result is a `Tuning` stored in engine.json; at load every linear layer gets its `LinearPlan`.

Weights are random tensors of the layer's shapes: speed does not depend on the values. An engine loaded
on another GPU model is re-tuned there (a few seconds per shape) instead of refused.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.config import BuildConfig, ModelConfig
from kiln.quant.methods import QuantConfig

GEMV_ROWS = (1, 2, 4, 8, 16)  # candidate decode batch sizes for the GEMV / GEMM crossover
PREFILL_ROWS = (64, 256, 1024, 4096)  # candidate row counts for the GEMM / dequantize+cuBLAS crossover


@dataclass
class LinearPlan:
    """How one quantized linear layer runs: which path for how many rows, with which block sizes."""

    gemv_max_m: int = 4  # rows up to which the GEMV runs (fp8: Triton GEMV instead of _scaled_mm; 0 never)
    dequant_min_m: int | None = None  # rows from which dequantize-then-cuBLAS runs (None: never)
    gemv: dict[str, int] = field(default_factory=dict)  # keyword arguments of *_gemv
    gemm: dict[str, int] = field(default_factory=dict)  # keyword arguments of *_gemm
    use_gemv1: bool = True  # int4: the word-wise single-row kernel for M = 1
    gemv1: dict[str, int] = field(default_factory=dict)  # its keyword arguments
    m1_us: float = 0.0  # measured time of the chosen path at one row, microseconds (for the record)


@dataclass
class Tuning:
    device: str  # the GPU's name, as torch reports it
    triton: str
    linear: dict[str, LinearPlan]  # linear_key(...) -> plan
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tuning:
        return cls(d["device"], d.get("triton", ""), {k: LinearPlan(**v) for k, v in d["linear"].items()},
                   float(d.get("seconds", 0.0)))


def layer_group(quant: QuantConfig, k: int) -> int:
    """Columns per scale group of a layer with K inputs (fp8 and per-channel formats: all of them)."""
    return k if quant.algo == "fp8" else (quant.group_size or k)


def linear_key(algo: str, n: int, k: int, group: int) -> str:
    return f"{algo}:{n}x{k}:g{group}"


def linear_shapes(cfg: ModelConfig, tp_size: int = 1) -> list[tuple[int, int]]:
    """(N, K) of each distinct linear layer of one rank: qkv, o, gate_up, down."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = [
        ((q + 2 * kv) // tp_size, cfg.hidden_size),
        (cfg.hidden_size, q // tp_size),
        (2 * cfg.intermediate_size // tp_size, cfg.hidden_size),
        (cfg.hidden_size, cfg.intermediate_size // tp_size),
    ]
    return list(dict.fromkeys(shapes))


def _bench(fn: Callable[[], Any]) -> float:
    """Milliseconds per call of fn on the GPU as a decode step runs it: inside a CUDA graph (a Python
    wrapper's launch cost would otherwise hide a 10 us kernel), replayed several times."""
    import triton

    return float(triton.testing.do_bench_cudagraph(fn, rep=20))


def _random_weights(algo: str, n: int, k: int, group: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    groups = k // group
    if algo == "fp8":
        w = (torch.randn(n, k, generator=g, device=device) * 0.1).to(torch.float8_e4m3fn)
        return {"weight": w, "weight_scale": torch.rand(n, generator=g, device=device) * 0.01}
    scales = (torch.rand(n, groups, generator=g, device=device) * 0.01).to(dtype)
    if algo == "int8_wo":
        q = torch.randint(-127, 128, (n, k), generator=g, device=device, dtype=torch.int16).to(torch.int8)
        return {"qweight": q, "scales": scales}
    q = torch.randint(0, 256, (n, k // 2), generator=g, device=device, dtype=torch.int16).to(torch.uint8)
    zeros = torch.randint(0, 16, (n, groups), generator=g, device=device, dtype=torch.int16).to(torch.uint8)
    return {"qweight": q, "scales": scales, "zeros": zeros}


def _paths(algo: str, w: dict[str, torch.Tensor], group: int) -> dict[str, Callable[..., torch.Tensor]]:
    """The candidate implementations of one layer: name -> fn(x, **config)."""
    if algo == "fp8":
        from kiln.kernels import fp8_matmul as f

        return {
            "gemv": lambda x, **c: f.fp8_gemv(x, w["weight"], w["weight_scale"], **c),
            "gemm": lambda x, **c: f.fp8_matmul(x, w["weight"], w["weight_scale"], gemv_max_m=0),
        }
    if algo == "int8_wo":
        from kiln.kernels import int8_matmul as i8

        qw, s = w["qweight"], w["scales"]
        return {
            "gemv": lambda x, **c: i8.int8_gemv(x, qw, s, group, **c),
            "gemm": lambda x, **c: i8.int8_gemm(x, qw, s, group, **c),
            "dequant": lambda x, **c: x @ i8.dequantize_int8(qw, s, group, x.dtype).t(),
        }
    from kiln.kernels import int4_matmul as i4

    qw, s, z = w["qweight"], w["scales"], w["zeros"]
    return {
        "gemv": lambda x, **c: i4.int4_gemv(x, qw, s, z, group, **c),
        "gemv1": lambda x, **c: i4.int4_gemv1(x, qw, s, z, group, **c),
        "gemm": lambda x, **c: i4.int4_gemm(x, qw, s, z, group, **c),
        "dequant": lambda x, **c: x @ i4.dequantize_int4(qw, s, z, group, x.dtype).t(),
    }


# The single-row int4 GEMV's grid: the region that won on an H100 for Mistral-7B's four shapes at groups
# of 64 and 128 (benchmarks/quant_gemv.py over a 4x wider grid: 8 warps and 16-word steps never won).
GEMV1_GRID = [
    dict(block_n=bn, chunk_words=cw, num_warps=4, split_k=sk, prefetch=pf)
    for bn in (64, 128)
    for cw in (32, 64)
    for pf in (0, 1)
    for sk in (None, 4, 8)
]

GEMV_GRID = [
    dict(block_n=bn, block_k=bk, num_warps=nw, split_k=sk)
    for bn in (16, 32, 64)
    for bk in (128, 256, 512)
    for nw in (4, 8)
    for sk in (None, 1)
]
# Options tried on the grid's winner only, one at a time (each would double the grid): warm, the L2
# prefetch before the grid dependency wait (kernels/pdl.py): 1 (the kernels' default) the program's
# whole share of the weight, 2 only its first lines, 0 none.
VARIANTS = {"gemv1": {"warm": (0, 2)}, "fp8:gemv": {"warm": (0, 2)}}


def _best(fn: Callable[..., torch.Tensor], x: torch.Tensor, grid: list[dict]) -> tuple[dict[str, int], float]:
    """The fastest configuration of fn(x, **config) in grid (None values dropped), and its time in ms."""
    best, best_ms = {}, float("inf")
    for cfg in grid:
        try:
            ms = _bench(lambda cfg=cfg: fn(x, **cfg))
        except Exception:  # a configuration this GPU cannot compile or run (shared memory, registers)
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    return {k: v for k, v in best.items() if v is not None}, best_ms


def _best_with_variants(fn: Callable[..., torch.Tensor], x: torch.Tensor, grid: list[dict],
                        variants: dict[str, tuple]) -> tuple[dict[str, int], float]:
    """_best over grid, then each variant of the winner (one option changed) that is faster."""
    best, best_ms = _best(fn, x, grid)
    for key, values in variants.items():
        cfg, ms = _best(fn, x, [dict(best, **{key: v}) for v in values])
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best, best_ms


L2_BYTES = 128 << 20  # copies of a layer's weight cycled so that each call reads it from HBM, not L2


class _Rotating:
    """Calls each of several weight copies' path in turn, so one call's time is one HBM read."""

    def __init__(self, algo: str, n: int, k: int, group: int, dtype: torch.dtype, device: str):
        one = _random_weights(algo, n, k, group, dtype, device)
        size = sum(t.numel() * t.element_size() for t in one.values())
        self.copies = [one] + [
            {name: t.clone() for name, t in one.items()} for _ in range(min(15, L2_BYTES // max(size, 1)))
        ]
        self.paths = [_paths(algo, w, group) for w in self.copies]

    def __contains__(self, name: str) -> bool:
        return name in self.paths[0]

    def __getitem__(self, name: str) -> Callable[..., Any]:
        def call_all(x: torch.Tensor, **cfg: int) -> None:
            for p in self.paths:
                p[name](x, **cfg)

        return call_all


def tune_linear(algo: str, n: int, k: int, group: int, max_rows: int, dtype: torch.dtype, device: str) -> LinearPlan:
    paths = _Rotating(algo, n, k, group, dtype, device)
    x1 = torch.randn(1, k, dtype=dtype, device=device)
    best_gemv, best_ms = _best_with_variants(paths["gemv"], x1, GEMV_GRID, VARIANTS.get(f"{algo}:gemv", {}))
    plan = LinearPlan(gemv=best_gemv)
    if "gemv1" in paths:
        plan.gemv1, ms1 = _best_with_variants(paths["gemv1"], x1, GEMV1_GRID, VARIANTS["gemv1"])
        plan.use_gemv1 = ms1 < best_ms
        best_ms = min(best_ms, ms1)
    plan.m1_us = round(best_ms * 1e3 / len(paths.paths), 2)
    # The GEMV keeps the rows up to the first batch size at which the GEMM is faster.
    plan.gemv_max_m = 0
    for m in (r for r in GEMV_ROWS if r <= max(max_rows, 1)):
        x = torch.randn(m, k, dtype=dtype, device=device)
        if _bench(lambda x=x: paths["gemv"](x, **plan.gemv)) > _bench(lambda x=x: paths["gemm"](x)):
            break
        plan.gemv_max_m = m
    if "dequant" in paths:
        for m in PREFILL_ROWS:
            x = torch.randn(m, k, dtype=dtype, device=device)
            if _bench(lambda x=x: paths["dequant"](x)) < _bench(lambda x=x: paths["gemm"](x)):
                plan.dequant_min_m = m
                break
    return plan


def tune(cfg: ModelConfig, quant: QuantConfig, build: BuildConfig, dtype: torch.dtype, device: str,
         tp_size: int = 1, log: Callable[[str], None] = print) -> Tuning:
    """Measure every distinct quantized linear shape of the model on `device` (a CUDA GPU)."""
    import triton

    start = time.perf_counter()
    table: dict[str, LinearPlan] = {}
    if quant.algo is not None:
        for n, k in linear_shapes(cfg, tp_size):
            group = layer_group(quant, k)
            key = linear_key(quant.algo, n, k, group)
            table[key] = tune_linear(quant.algo, n, k, group, build.max_batch_size, dtype, device)
            log(f"tuned {key}: {table[key]}")
    name = torch.cuda.get_device_name(torch.device(device))
    return Tuning(name, triton.__version__, table, time.perf_counter() - start)


def for_engine(model: torch.nn.Module, cfg: Any, device: str, log: Callable[[str], None] = print) -> Tuning | None:
    """The engine's stored tuning when it was measured on this GPU model, else a fresh one (and why);
    applied to the model's layers. None where there is nothing to tune (full precision)."""
    quant = QuantConfig.from_dict(cfg.quantization)
    if quant.algo is None:
        return None
    here = torch.cuda.get_device_name(torch.device(device))
    stored = Tuning.from_dict(cfg.tuning) if getattr(cfg, "tuning", None) else None
    if stored is None or stored.device != here:
        why = "it has no kernel tuning" if stored is None else f"it was tuned on {stored.device}"
        log(f"the engine's kernels are being tuned for this {here} ({why}); `kiln build` here stores it")
        dtype = next(p for p in model.parameters() if p.is_floating_point() and p.element_size() > 1).dtype
        stored = tune(cfg.model, quant, cfg.build, dtype, device, cfg.tp_size, log=lambda _: None)
    apply(model, stored)
    return stored


def apply(model: torch.nn.Module, tuning: Tuning | None) -> int:
    """Give each quantized linear layer its plan (layers without one keep the kernels' defaults).
    Returns how many layers got a plan."""
    from kiln.layers.linear import LinearBase

    count = 0
    for module in model.modules():
        if not isinstance(module, LinearBase) or module.quant_config.algo is None:
            continue
        q = module.quant_config
        key = linear_key(q.algo, module.out_features, module.in_features, layer_group(q, module.in_features))
        plan = tuning.linear.get(key) if tuning else None
        module.plan = plan
        count += plan is not None
    return count
