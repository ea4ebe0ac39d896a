"""Architecture name (config.json `architectures[0]`) -> kiln model class."""

from __future__ import annotations

import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.distributed.comm import SINGLE, TPGroup
from kiln.models.llama import LlamaForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def create_model(
    cfg: ModelConfig, max_positions: int, device: torch.device | str, tp: TPGroup = SINGLE
) -> LlamaForCausalLM:
    """Build the model with its parameters on the meta device (rotary tables on `device`)."""
    cls = MODELS[cfg.architecture]
    with torch.device("meta"):
        return cls(cfg, max_positions, device, tp)  # type: ignore[return-value]
