"""Architecture name (config.json `architectures[0]`) -> kiln model class."""

from __future__ import annotations

import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.distributed.comm import SINGLE, TPGroup
from kiln.models.llama import LlamaForCausalLM
from kiln.quant.methods import QuantConfig

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def create_model(
    cfg: ModelConfig,
    max_positions: int,
    device: torch.device | str,
    tp: TPGroup = SINGLE,
    quant: QuantConfig | None = None,
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """Build the model with its parameters on the meta device (rotary tables on `device`).

    Floating-point parameters get `dtype`; quantized ones keep the dtype their format stores.
    """
    cls = MODELS[cfg.architecture]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return cls(cfg, max_positions, device, tp, quant)  # type: ignore[return-value]
    finally:
        torch.set_default_dtype(previous)
