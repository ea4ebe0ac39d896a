"""The same latency measurement through transformers' own `generate` (static KV cache), for a ratio.

The Hugging Face model gets the same shapes (a config.json written from kiln's ModelConfig) and its own
random weights on the device: speed does not depend on what the weights say. TTFT is timed as a
one-token generate; time per output token as the rest of a full generate, over the decode steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kiln.config import ModelConfig


@dataclass(frozen=True)
class HfResult:
    ttft_s: float
    tpot_s: float
    batch_size: int

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch_size / self.tpot_s


def hf_config_dict(cfg: ModelConfig) -> dict:
    """A Hugging Face config.json dict of kiln's ModelConfig (the inverse of ModelConfig.from_hf)."""
    rope = cfg.rope
    d = {
        "architectures": [cfg.architecture],
        "model_type": {"MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}.get(cfg.architecture, "llama"),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": rope.theta,
        "hidden_act": "silu",
        "eos_token_id": cfg.eos_token_id,
    }
    if rope.rope_type != "default":
        d["rope_scaling"] = {
            "rope_type": rope.rope_type, "factor": rope.factor, "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
        }
    if any(cfg.sliding_windows):
        d["sliding_window"] = max(cfg.sliding_windows)
    return d


def measure_hf_generate(
    cfg: ModelConfig, batch_size: int, input_len: int, output_len: int, device: str, dtype: torch.dtype,
    seed: int = 0,
) -> HfResult:
    from transformers import AutoConfig, AutoModelForCausalLM

    d = hf_config_dict(cfg)
    hf_cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch_size, input_len), device=device)

    def generate(n: int) -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, cache_implementation="static", pad_token_id=0)
        _sync(device)
        return time.perf_counter() - start

    generate(output_len)  # warm-up (and compilation, where transformers compiles the static-cache step)
    ttft = min(generate(1) for _ in range(3))
    total = generate(output_len)
    return HfResult(ttft, (total - ttft) / max(output_len - 1, 1), batch_size)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
