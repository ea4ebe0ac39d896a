"""A decode step's quantized kernels at batch 1, with and without programmatic dependent launch.

    python3 benchmarks/pdl_chain.py [--synthetic mistral-7b-v0.3] [--formats int4_awq:128 fp8] [--layers 32]
        [--warm 1]

Per layer, as a decode step runs them (attention left out): RMSNorm with the residual, the qkv GEMV,
the o GEMV (on the first columns of qkv's output), RMSNorm, the gate_up GEMV, SiLU-and-mul, the down
GEMV; random weights of the model's shapes, the kernels' default block sizes. The chain is captured in
one CUDA graph with KILN_PDL=0, 1 and late (kernels/pdl.py), the outputs must be
bit-equal (same kernels, same order of sums), and each graph's replay time is printed with the bytes
the weights take and the bandwidth that reaches.
"""

from __future__ import annotations

import argparse
import os
from functools import partial

import torch

from kiln.bench.synthetic import SHAPES
from kiln.kernels import activation, fp8_matmul, int4_matmul, pdl, rmsnorm, tuning


def layer_weights(algo: str, cfg, group: int) -> list[dict]:
    shapes = tuning.linear_shapes(cfg)  # qkv, o, gate_up, down
    out = []
    for n, k in shapes:
        w = tuning._random_weights(algo, n, k, group or k, torch.bfloat16, "cuda")
        out.append(w)
    return out


WARM = 1  # --warm: the GEMVs' L2 prefetch before their wait (1 all of their weight, 2 the first lines, 0 none)


def gemv(algo: str, group: int, w: dict, x: torch.Tensor) -> torch.Tensor:
    if algo == "fp8":
        return fp8_matmul.fp8_gemv(x, w["weight"], w["weight_scale"], warm=WARM)
    return int4_matmul.int4_matmul(x, w["qweight"], w["scales"], w["zeros"], group, gemv1={"warm": WARM})


def step(algo: str, group: int, layers: list[list[dict]], norm_w: torch.Tensor, x: torch.Tensor,
         hidden: int) -> torch.Tensor:
    residual = x.clone()
    h = x
    fp8 = algo == "fp8"
    for qkv, o, gate_up, down in layers:
        normed, residual = rmsnorm.rms_norm(h, norm_w, 1e-5, residual=residual, quantize_fp8=fp8)
        q = gemv(algo, group, qkv, normed)
        h = gemv(algo, group, o, q[:, :o_in(o, algo)].contiguous())
        normed, residual = rmsnorm.rms_norm(h, norm_w, 1e-5, residual=residual, quantize_fp8=fp8)
        act = activation.silu_and_mul(gemv(algo, group, gate_up, normed))
        h = gemv(algo, group, down, act)
    return h


def o_in(w: dict, algo: str) -> int:
    return w["weight"].shape[1] if algo == "fp8" else 2 * w["qweight"].shape[1]


def capture(fn):
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def time_graph(graph: torch.cuda.CUDAGraph, reps: int = 50) -> float:
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", default="mistral-7b-v0.3", choices=sorted(SHAPES))
    ap.add_argument("--formats", nargs="+", default=["int4_awq:128", "fp8"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--warm", type=int, default=1, choices=(0, 1, 2))
    args = ap.parse_args()
    global WARM
    WARM = args.warm
    cfg = SHAPES[args.synthetic]
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    x = torch.randn(1, cfg.hidden_size, device="cuda").to(torch.bfloat16)
    norm_w = (1 + 0.1 * torch.randn(cfg.hidden_size, device="cuda")).to(torch.bfloat16)
    for item in args.formats:
        algo, _, g = item.partition(":")
        group = int(g) if g else 0
        layers = [layer_weights(algo, cfg, group) for _ in range(args.layers)]
        nbytes = sum(t.numel() * t.element_size() for layer in layers for w in layer for t in w.values())
        results = {}
        for flag in ("0", "1", "late"):
            os.environ["KILN_PDL"] = flag
            pdl._enabled.cache_clear()
            graph, out = capture(partial(step, algo, group, layers, norm_w, x, cfg.hidden_size))
            ms = time_graph(graph)
            results[flag] = (ms, out.clone())
            print(f"{item:14} KILN_PDL={flag}: {ms:.3f} ms per step, {nbytes / ms / 1e6:.0f} GB/s "
                  f"({nbytes / 1e9:.2f} GB of weights), on={pdl.pdl_args(x.device)['USE_PDL']}", flush=True)
            del graph
        for flag in ("1", "late"):
            same = torch.equal(results["0"][1], results[flag][1])
            print(f"{item:14} KILN_PDL={flag}: outputs bit-equal to KILN_PDL=0: {same}; saves "
                  f"{(results['0'][0] - results[flag][0]) * 1e3:.0f} us per step", flush=True)
        layers.clear()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
