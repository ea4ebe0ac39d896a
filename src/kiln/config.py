"""Configuration as frozen dataclasses, each built once from its source and never inferred later.

`ModelConfig` describes the network (read from a Hugging Face config.json), `BuildConfig` the limits an
engine is built for, `SamplingParams` how one request picks its tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import KilnError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "float16", "bfloat16")
QFORMATS = ("full_prec", "int8_wo", "int4_wo", "int4_awq", "fp8")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `rope_type` is one of SUPPORTED_ROPE_TYPES."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder (Llama 1/2/3, Mistral, Mistral-Nemo, Qwen2)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_proj_bias: bool = False  # Llama's attention_bias also puts a bias on o_proj (Qwen2's does not)
    # Per layer: the sliding attention window in tokens, or 0 for full attention.
    sliding_windows: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Every end-of-sequence id the model declares (Llama 3.1 Instruct has three); any of them ends a reply.
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (0,) * self.num_layers)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from the dict of a Hugging Face config.json (old `rope_scaling` or new `rope_parameters`)."""
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else _ARCH_BY_MODEL_TYPE.get(hf.get("model_type", ""), "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise KilnError(
                f"config.json: architecture {arch or hf.get('model_type')!r} is not supported; "
                f"kiln supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise KilnError(f"config.json: hidden_act {act!r} is not supported; kiln supports 'silu'")
        if hf.get("mlp_bias"):
            raise KilnError("config.json: mlp_bias=true is not supported by kiln's Llama decoder")
        missing = [k for k in _REQUIRED_HF_KEYS if k not in hf]
        if missing:
            raise KilnError(f"config.json: {', '.join(missing)} missing; it is not a complete Hugging Face config")
        num_heads = int(hf["num_attention_heads"])
        num_kv = int(hf.get("num_key_value_heads") or num_heads)
        if num_heads < 1 or num_kv < 1 or num_heads % num_kv:
            raise KilnError(f"config.json: num_attention_heads {num_heads} is not a multiple of "
                            f"num_key_value_heads {num_kv}")
        hidden = int(hf["hidden_size"])
        num_layers = int(hf["num_hidden_layers"])
        return cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
            o_proj_bias=arch == "LlamaForCausalLM" and bool(hf.get("attention_bias", False)),
            sliding_windows=_sliding_windows_from_hf(hf, arch, num_layers),
            bos_token_id=_first_id(hf.get("bos_token_id")),
            eos_token_id=_first_id(hf.get("eos_token_id")),
            eos_token_ids=_all_ids(hf.get("eos_token_id")),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["rope"] = RopeConfig(**d.get("rope", {}))
        d["sliding_windows"] = tuple(d.get("sliding_windows", ()))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


_REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _all_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise KilnError(
            f"config.json: rope_type {rope_type!r} is not supported; kiln supports "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise KilnError("config.json: partial_rotary_factor other than 1.0 is not supported")
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
        ),
    )


def _sliding_windows_from_hf(hf: dict[str, Any], arch: str, num_layers: int) -> tuple[int, ...]:
    window = hf.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False):
        window = None
    if not window:
        return (0,) * num_layers
    layer_types = hf.get("layer_types")
    if layer_types is None and arch == "Qwen2ForCausalLM":
        first = int(hf.get("max_window_layers", num_layers))
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if layer_types is None:
        layer_types = ["sliding_attention"] * num_layers
    return tuple(int(window) if t == "sliding_attention" else 0 for t in layer_types)


@dataclass(frozen=True)
class BuildConfig:
    """The limits an engine is built for; requests beyond them are refused with both numbers named."""

    max_batch_size: int = 8
    max_input_len: int = 1024
    max_seq_len: int = 2048
    max_num_tokens: int = 8192
    tokens_per_block: int = 64

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "tokens_per_block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KilnError(f"--{name} {value!r} is invalid: it must be a positive integer")
        if self.max_input_len > self.max_seq_len:
            raise KilnError(
                f"--max_input_len {self.max_input_len} is larger than --max_seq_len "
                f"{self.max_seq_len}: raise --max_seq_len or lower --max_input_len"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. temperature 0 means greedy; top_k 0 and top_p 1 are off."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    end_id: int | None = None
    ignore_eos: bool = False
    # Each stop sequence is a list of token ids; generation ends when the output ends with one.
    stop_token_ids: tuple[tuple[int, ...], ...] = ()
    # Stop strings: generation ends when the output text contains one; it is cut before it.
    stop: tuple[str, ...] = ()
    # Token sequences that are never generated (the last token of each is banned where the text so far
    # ends with the others).
    bad_token_ids: tuple[tuple[int, ...], ...] = ()
    # Log probability of each output token, and of this many most likely alternatives (None: none).
    logprobs: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, "at least 1"),
            ("temperature", self.temperature >= 0, "0 (greedy) or more"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer, 0 (off) or more"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "more than 0"),
            ("stop", all(self.stop), "non-empty strings"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"between 0 and {MAX_LOGPROBS}"),
        ]
        for name, ok, limit in checks:
            if not ok:
                raise KilnError(f"{name} {getattr(self, name)!r} is invalid: it must be {limit}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @functools.cached_property
    def edits_logits(self) -> bool:
        """Whether penalties or banned tokens change the logits before a token is chosen."""
        return bool(self.bad_token_ids) or self.repetition_penalty != 1.0 or bool(
            self.presence_penalty or self.frequency_penalty)

    @functools.cached_property
    def needs_host(self) -> bool:
        """Whether choosing a token needs the host: penalties and banned words read the tokens so far,
        log probabilities are recorded there."""
        return self.edits_logits or self.logprobs is not None

    @functools.cached_property
    def plain_greedy(self) -> bool:
        """The argmax of the model's logits is the token: nothing else to do for it."""
        return self.greedy and not self.needs_host
