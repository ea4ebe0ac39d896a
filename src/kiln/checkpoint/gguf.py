"""GGUF file -> Hugging Face model folder (dequantized safetensors, config.json, tokenizer).

The `gguf` package reads and dequantizes the tensors; we rename them to Hugging Face's names and undo
the row permutation llama.cpp applies to Llama q/k projections (its rotary kernels pair adjacent
elements, Hugging Face's pair the two halves). transformers supplies the config and the tokenizer.
The result is an ordinary folder that `kiln convert` and `--tokenizer_dir` take as usual.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from kiln.errors import KilnError
from kiln.fsutil import atomic_dir

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_SUPPORTED_ARCHES = ("llama", "qwen2")


def hf_name(gguf_name: str) -> str | None:
    """llama.cpp tensor name -> Hugging Face name (None for tensors kiln does not use)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, interleaved pairs -> first half, second half."""
    rest = w.shape[1:]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def read_gguf_tensors(
    path: Path, arch: str, n_heads: int, n_kv_heads: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Every tensor kiln uses, dequantized and cast to `dtype` one at a time (peak: the model in `dtype`)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensors = {}
    for t in GGUFReader(str(path)).tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions fastest first
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32, copy=True))
        w = w.reshape(shape)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute_rows(w, n_heads if "q_proj" in name else n_kv_heads)
        tensors[name] = w.to(dtype)
    return tensors


def gguf_to_hf(gguf_file: str | Path, output_dir: str | Path, dtype: str = "float32") -> Path:
    """Write an HF folder for `gguf_file` into `output_dir` (atomically); returns the folder."""
    path = Path(gguf_file)
    if not path.is_file():
        raise KilnError(f"--gguf {gguf_file}: no such file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise KilnError(f"--gguf {gguf_file}: not a GGUF file (it does not start with the GGUF magic)")
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KilnError(f"--gguf {gguf_file}: transformers cannot read its config or tokenizer ({first})") from None
    if config.model_type not in _SUPPORTED_ARCHES:
        raise KilnError(f"--gguf {gguf_file}: architecture {config.model_type!r} is not supported "
                        f"(kiln reads {', '.join(_SUPPORTED_ARCHES)} GGUF files)")
    tensors = read_gguf_tensors(path, config.model_type, config.num_attention_heads, config.num_key_value_heads,
                                getattr(torch, dtype))
    config.tie_word_embeddings = "lm_head.weight" not in tensors
    config.dtype = dtype
    out = Path(output_dir)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / ".kiln-gguf").write_text(f"converted by kiln from {path.name}\n")
    return out
