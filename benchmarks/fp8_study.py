"""Where fp8 (W8A8 e4m3) loses perplexity on SmolLM2-135M, and what wins it back.

    python3 benchmarks/fp8_study.py [--eval_windows 4] [--calib_windows 16] [--alphas 0 0.3 0.5 0.7]
        [--weights rtn gptq] [--activations token] [--o_proj gqa|skip]

A study, not kiln's path: it fake-quantizes the linear layers of transformers' float32 SmolLM2 (the
embedded model) in place with forward pre-hooks, and prints perplexity on held-out KJV text (the same
windows as `kiln quantize --eval`) for each combination of:
  - SmoothQuant smoothing of strength alpha (0: none), with kiln's factors folded into the norms,
    v_proj and up_proj (kiln.quant.smooth, max |x| over the calibration windows);
  - e4m3 weights with per-channel scales, rounded to nearest (kiln's plain fp8) or by GPTQ
    (kiln.quant.gptq, for the float model's inputs of the layer: the study has no sequential variant,
    kiln's recipe is measured by benchmarks/quant_quality.py);
  - activations per token (kiln's fp8), or per group of 64 or 32 columns within a token (finer scales,
    as in fine-grained fp8 recipes; not kiln's format), or float.
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


WEIGHTS = {
    "rtn": "e4m3 rounded to nearest (kiln's fp8 without calibration)",
    "gptq": "GPTQ rounding for the float model's inputs of the layer",
}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kiln.assets import smollm2_hf_dir
    from kiln.quant.calib import load_text, token_windows
    from kiln.quant.gptq import gptq_fp8

    p = argparse.ArgumentParser()
    p.add_argument("--eval_windows", type=int, default=4, help="windows of 512 held-out tokens")
    p.add_argument("--calib_windows", type=int, default=16, help="windows of 512 calibration tokens")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7],
                   help="smoothing strengths (0: none)")
    p.add_argument("--weights", nargs="+", default=["rtn", "gptq"], choices=WEIGHTS,
                   help="weight rounding: " + "; ".join(f"{k}: {v}" for k, v in WEIGHTS.items()))
    p.add_argument("--activations", nargs="+", default=["token"], choices=("float", "token", "64", "32"),
                   help="activation scales: float (none), per token, per 64 or 32 columns of a token")
    p.add_argument("--o_proj", default="gqa", choices=("gqa", "skip"),
                   help="smooth o_proj's input with factors shared per kv head, or leave it")
    args = p.parse_args()
    torch.manual_seed(0)
    folder = smollm2_hf_dir()
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    evals = token_windows(tok, load_text("kjv", "eval"), args.eval_windows, 512, "--dataset")
    calib = token_windows(tok, load_text("kjv", "calib"), args.calib_windows, 512, "--calib_dataset")
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    state: dict = {"act": None, "stats": None}

    def pre_hook(module: nn.Module, inputs: tuple) -> tuple | None:
        x = inputs[0]
        if state["stats"] is not None:
            flat = x.reshape(-1, x.shape[-1])
            stats = state["stats"].setdefault(module, {"x_max": 0, "hessian": 0})
            stats["x_max"] = flat.abs().amax(0).clamp(min=stats["x_max"])
            if "gptq" in args.weights:
                stats["hessian"] = stats["hessian"] + flat.double().T @ flat.double()
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

    @torch.no_grad()
    def calibrate() -> dict:
        """Inputs of every linear over the calibration windows, float weights: max |x| and H = sum x^T x."""
        state["stats"] = {}
        for window in calib:
            model(torch.as_tensor(window).reshape(1, -1))
        stats, state["stats"] = state["stats"], None
        return stats

    full = perplexity()
    print(f"{args.eval_windows * 512} held-out tokens; full precision {full:.3f}; o_proj: {args.o_proj}")
    print("| weights | smoothing alpha | activations | perplexity | vs full precision |")
    print("| --- | --- | --- | --- | --- |")
    acts = {"float": None, "token": 0, "64": 64, "32": 32}
    stats = calibrate()
    for alpha in args.alphas:
        model.load_state_dict(original)
        if alpha:
            smooth(model, {m: v["x_max"] for m, v in stats.items()}, alpha, args.o_proj == "gqa")
        smoothed = {m: m.weight.data.clone() for m in linears}
        now = calibrate() if alpha and args.weights != ["rtn"] else stats  # H of x / s
        for wname in args.weights:
            start = time.perf_counter()
            for m in linears:
                if wname == "rtn":
                    m.weight.data = fp8_rows(smoothed[m])
                else:
                    q = gptq_fp8(smoothed[m], now[m]["hessian"])
                    m.weight.data = q["weight"].float() * q["weight_scale"][:, None]
            took = time.perf_counter() - start
            for aname in args.activations:
                state["act"] = acts[aname]
                ppl = perplexity()
                state["act"] = None
                print(f"| {wname} | {alpha:g} | {aname} | {ppl:.3f} | {100 * (ppl / full - 1):+.2f}% |"
                      f"  ({wname}: {took:.0f} s)", flush=True)


def smooth(model: nn.Module, x_max: dict, alpha: float, with_o: bool) -> None:
    """Fold kiln's smoothing factors (kiln.quant.smooth.smooth_layer) into every decoder layer."""
    from kiln.quant import smooth as sq

    cfg = model.config
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    for layer in model.model.layers:
        w = {k: v.clone() for k, v in layer.state_dict().items()}
        mods = dict(layer.named_modules())
        taps = {site.tap: x_max[mods[site.linears[0]]] for site in sq.SITES}
        sites = sq.SITES if with_o else tuple(s for s in sq.SITES if s.tap != "o")
        sq.smooth_layer(w, taps, alpha, cfg.num_key_value_heads, rep, sites)
        layer.load_state_dict(w)


if __name__ == "__main__":
    main()
