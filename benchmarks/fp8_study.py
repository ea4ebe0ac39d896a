"""Where fp8 (W8A8 e4m3) loses perplexity on SmolLM2-135M, and what would win it back.

    python3 benchmarks/fp8_study.py [--eval_windows 4] [--calib_windows 16]

A study, not kiln's path: it fake-quantizes the linear layers of transformers' float32 SmolLM2 (the
embedded model) in place with forward pre-hooks, and prints perplexity on held-out KJV text (the same
windows as `kiln quantize --eval`) for:
  - e4m3 weights, per-channel scales, rounded to nearest (kiln's fp8 weights);
  - the same weights rounded by GPTQ (column by column, each rounding error spread over the columns not
    yet rounded through the inverse Hessian of the layer's calibration inputs);
  - activations per token (kiln's fp8), or per group of 64 or 32 columns within a token (finer scales,
    as in fine-grained fp8 recipes), with either weight rounding.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

E4M3_MAX = 448.0


def fp8_rows(x: torch.Tensor, group: int = 0) -> torch.Tensor:
    """Per-row (per-token) or per-group-of-columns dynamic e4m3 quantization and back."""
    shape = x.shape
    if group:
        x = x.reshape(*shape[:-1], shape[-1] // group, group)
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    y = (x / scale).to(torch.float8_e4m3fn).float() * scale
    return y.reshape(shape)


def gptq_fp8(w: torch.Tensor, hessian: torch.Tensor, block: int = 128, damp: float = 0.01) -> torch.Tensor:
    """e4m3 weights with per-output-channel scales (as kiln's), rounded by GPTQ."""
    w = w.double().clone()
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    scale = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    q = torch.zeros_like(w)
    for b0 in range(0, w.shape[1], block):
        b1 = min(b0 + block, w.shape[1])
        part, err = w[:, b0:b1].clone(), torch.zeros(w.shape[0], b1 - b0, dtype=w.dtype)
        for i in range(b1 - b0):
            col = part[:, i : i + 1]
            qc = (col / scale).clamp(-E4M3_MAX, E4M3_MAX).float().to(torch.float8_e4m3fn).double() * scale
            q[:, b0 + i] = qc[:, 0]
            e = (col - qc)[:, 0] / u[b0 + i, b0 + i]
            part[:, i:] -= e[:, None] * u[b0 + i, b0 + i : b1][None, :]
            err[:, i] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return q.float()


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kiln.assets import smollm2_hf_dir
    from kiln.quant.calib import load_text, token_windows

    p = argparse.ArgumentParser()
    p.add_argument("--eval_windows", type=int, default=4, help="windows of 512 held-out tokens")
    p.add_argument("--calib_windows", type=int, default=16, help="windows of 512 calibration tokens (GPTQ)")
    args = p.parse_args()
    torch.manual_seed(0)
    folder = smollm2_hf_dir()
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    evals = token_windows(tok, load_text("kjv", "eval"), args.eval_windows, 512, "--dataset")
    calib = token_windows(tok, load_text("kjv", "calib"), args.calib_windows, 512, "--calib_dataset")
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]
    original = {m: m.weight.data.clone() for m in linears}
    state: dict = {"act": None, "hessians": None}

    def pre_hook(module: nn.Module, inputs: tuple) -> tuple | None:
        x = inputs[0]
        if state["hessians"] is not None:
            flat = x.reshape(-1, x.shape[-1]).double()
            state["hessians"][module] += flat.T @ flat
        if state["act"] is None:
            return None
        return (fp8_rows(x, state["act"]),)

    for m in linears:
        m.register_forward_pre_hook(pre_hook)

    @torch.no_grad()
    def perplexity() -> float:
        nll, count = 0.0, 0
        for window in evals:
            ids = torch.as_tensor(window).reshape(1, -1)
            logits = model(ids).logits[0, :-1]
            nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
        return math.exp(nll / count)

    start = time.perf_counter()
    state["hessians"] = {m: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for m in linears}
    with torch.no_grad():
        for window in calib:
            model(torch.as_tensor(window).reshape(1, -1))
    hessians, state["hessians"] = state["hessians"], None
    gptq = {m: gptq_fp8(original[m], hessians[m]) for m in linears}
    print(f"calibration and GPTQ: {time.perf_counter() - start:.0f} s", flush=True)

    full = perplexity()
    print(f"{args.eval_windows * 512} held-out tokens; full precision {full:.3f}")
    print("| weights | activations | perplexity | vs full precision |")
    print("| --- | --- | --- | --- |")
    for wname, weights in (("round to nearest", lambda m: fp8_rows(original[m])), ("GPTQ", lambda m: gptq[m])):
        for m in linears:
            m.weight.data = weights(m)
        for aname, act in (("float", None), ("per token", 0), ("per 64 columns", 64), ("per 32 columns", 32)):
            state["act"] = act
            ppl = perplexity()
            print(f"| {wname} | {aname} | {ppl:.3f} | {100 * (ppl / full - 1):+.2f}% |", flush=True)


if __name__ == "__main__":
    main()
