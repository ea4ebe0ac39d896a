"""One-row quantized matmuls per layer shape: time, achieved bandwidth and the best block sizes.

    python3 benchmarks/quant_gemv.py [--synthetic mistral-7b-v0.3] [--formats int4_awq:128 int4_awq:64 fp8]
                                     [--top 3] [--json OUT]

For each distinct linear layer of the model (qkv, o, gate_up, down) and each format, times every
configuration of the tuner's one-row grid (kernels/tuning.py) inside CUDA graphs with the weight read
from HBM (copies cycled past the L2), and prints the best few with the bytes each call must read and
the bandwidth that reaches. The bf16 cuBLAS GEMV of the same shape is the reference line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kiln.bench.synthetic import SHAPES
from kiln.kernels import tuning


def weight_bytes(w: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in w.values())


def time_grid(algo: str, n: int, k: int, group: int, top: int) -> list[dict]:
    paths = tuning._Rotating(algo, n, k, group, torch.bfloat16, "cuda")
    per_call = weight_bytes(paths.copies[0])
    x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
    rows = []
    names = ["gemv1", "gemv"] if "gemv1" in paths else ["gemv"]
    for name in names:
        grid = tuning.GEMV1_GRID if name == "gemv1" else tuning.GEMV_GRID
        variants = tuning.VARIANTS.get(name if name == "gemv1" else f"{algo}:{name}", {})
        grid = grid + [dict(cfg, **{key: v}) for cfg in grid for key, vals in variants.items() for v in vals]
        for cfg in grid:
            try:
                ms = tuning._bench(lambda cfg=cfg, name=name: paths[name](x, **cfg)) / len(paths.copies)
            except Exception as e:  # noqa: BLE001 - a configuration this GPU cannot run
                rows.append({"path": name, "config": cfg, "error": type(e).__name__})
                continue
            rows.append({"path": name, "config": {a: b for a, b in cfg.items() if b is not None},
                         "us": ms * 1e3, "gbps": per_call / ms / 1e6})
    ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
    return ok[:top]


def bf16_line(n: int, k: int) -> dict:
    copies = max(2, tuning.L2_BYTES // (n * k * 2) + 1)
    ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
    x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")

    def call() -> None:
        for w in ws:
            torch.nn.functional.linear(x, w)

    ms = tuning._bench(call) / copies
    return {"us": ms * 1e3, "gbps": n * k * 2 / ms / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", default="mistral-7b-v0.3", choices=sorted(SHAPES))
    ap.add_argument("--formats", nargs="+", default=["int4_awq:128", "int4_awq:64"],
                    help="ALGO[:GROUP] items (fp8 and per-channel formats take no group)")
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    cfg = SHAPES[args.synthetic]
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    results = []
    for n, k in tuning.linear_shapes(cfg):
        ref = bf16_line(n, k)
        print(f"{n}x{k}: bf16 cuBLAS {ref['us']:.1f} us, {ref['gbps']:.0f} GB/s")
        for item in args.formats:
            algo, _, g = item.partition(":")
            group = int(g) if g else k
            best = time_grid(algo, n, k, group, args.top)
            for r in best:
                print(f"  {item:14} {r['path']:6} {r['us']:7.1f} us {r['gbps']:6.0f} GB/s  {r['config']}")
            results.append({"shape": [n, k], "format": item, "bf16": ref, "best": best})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
