"""Defaults of fp8's calibrated recipe (quant/fp8.py), kept free of torch so `kiln quantize --help` is quick.

Measured on SmolLM2-135M, KJV held-out text (BENCHMARKS.md, benchmarks/fp8_study.py).
"""

FP8_SMOOTHQUANT = 0.0  # smoothing strength alpha folded into the weights: 0, none, measured best with GPTQ
FP8_GPTQ = True  # weights rounded by GPTQ on the calibration text
