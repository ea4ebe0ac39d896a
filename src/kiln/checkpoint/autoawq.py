"""AutoAWQ ("GEMM") Hugging Face folders <-> kiln int4_awq checkpoints, exactly, without re-quantizing.

Why: most published AWQ models (TheBloke/*-AWQ, Qwen/*-AWQ, ...) are AutoAWQ folders. They hold the same
numbers kiln's int4_awq holds (4-bit integers, a 4-bit zero point and a scale per group of input columns,
w = (q - z) * s); only the packing differs. Re-packing keeps every integer, zero and scale, so a model
quantized elsewhere runs in kiln with exactly its published weights, and the export lets a kiln
checkpoint go to other runtimes (vLLM, transformers) and back bit for bit.

The AutoAWQ GEMM layout, per linear of in_features K and out_features N (group g along K):
    qweight  int32   [K, N // 8]       8 output columns of 4-bit integers per word
    qzeros   int32   [K // g, N // 8]  the 4-bit zero points, packed the same way
    scales   float16 [K // g, N]
    w[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n], and the layer computes x @ w (w is W^T, [K, N]).
Within each group of 8 columns 8j..8j+7, nibble i of the word (bits 4i..4i+3) holds column
8j + AWQ_ORDER[i], AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]: the low nibble holds column 0, the next one
column 2, ..., the high nibble column 7. Source: `WQLinear_GEMM.from_linear`,
    https://github.com/casper-hansen/AutoAWQ/blob/main/awq/modules/linear/gemm.py
    (`qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (i * 4)`, order_map = [0, 2, 4, 6, 1, 3, 5, 7];
    qzeros alike), and its inverse `reverse_awq_order` (AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]) in
    https://github.com/casper-hansen/AutoAWQ/blob/main/awq/utils/packing_utils.py
The words are signed int32, so a column whose value is 8..15 in the high nibble makes the word negative.
config.json names the format as AutoAWQ's `AwqConfig.to_transformers_dict` writes it
(https://github.com/casper-hansen/AutoAWQ/blob/main/awq/models/_config.py):
    {"quant_method": "awq", "zero_point": true, "group_size": g, "bits": 4, "version": "gemm",
     "modules_to_not_convert": null}
older folders have a quant_config.json with w_bit / q_group_size instead (vLLM reads both spellings).
AutoAWQ's group_size -1 (one group per row) is kiln's group_size 0.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kiln.checkpoint.format import load_config
from kiln.checkpoint.safetensors_io import hf_weight_files, iter_tensors
from kiln.config import ModelConfig
from kiln.errors import KilnError
from kiln.fsutil import atomic_dir, read_json, require_dir
from kiln.quant.formats import pack_int4, unpack_int4
from kiln.quant.methods import QuantConfig
from kiln.quant.rtn import LINEAR_NAMES, is_quantized_linear, quantize_weight
from kiln.runtime.tokenizer import tokenizer_files

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column AWQ_ORDER[i] of its 8
_COLUMN_NIBBLE = tuple(AWQ_ORDER.index(c) for c in range(8))  # column c sits in nibble (0, 4, 1, 5, 2, 6, 3, 7)[c]
_SHIFTS = torch.arange(0, 32, 4)  # [8] bit offset of each nibble
AWQ_PARTS = ("qweight", "qzeros", "scales")
SUPPORTED = "kiln reads AutoAWQ checkpoints with quant_method 'awq', version 'gemm', bits 4, zero_point true"


# ---- one linear ------------------------------------------------------------------------------------

def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """[rows, cols] integers 0..15 -> [rows, cols // 8] int32 words in AutoAWQ's nibble order."""
    rows, cols = q.shape
    if cols % 8:
        raise KilnError(f"AutoAWQ packs 8 columns per int32: {cols} output features is not a multiple of 8")
    nibbles = q.to(torch.int64).reshape(rows, cols // 8, 8)[..., list(AWQ_ORDER)]  # [rows, cols // 8, 8]
    words = (nibbles << _SHIFTS).sum(dim=-1)  # 0 .. 2**32 - 1
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # same 32 bits, signed


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """[rows, cols // 8] int32 words -> [rows, cols] uint8 values 0..15 (inverse of pack_awq)."""
    nibbles = (words.to(torch.int64).unsqueeze(-1) >> _SHIFTS) & 0xF  # [rows, cols // 8, 8], nibble order
    return nibbles[..., list(_COLUMN_NIBBLE)].reshape(words.shape[0], -1).to(torch.uint8)


def export_autoawq(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kiln int4 {qweight [N, K/2] uint8, zeros [N, K/g] uint8, scales [N, K/g]} -> AutoAWQ's
    {qweight [K, N/8] int32, qzeros [K/g, N/8] int32, scales [K/g, N] float16}."""
    q = unpack_int4(parts["qweight"])  # [N, K]
    return {
        "qweight": pack_awq(q.T),  # [K, N // 8]
        "qzeros": pack_awq(parts["zeros"].T),  # [K // g, N // 8]
        "scales": parts["scales"].T.to(torch.float16).contiguous(),  # [K // g, N]
    }


def import_autoawq_linear(parts: dict[str, torch.Tensor], group_size: int, name: str) -> dict[str, torch.Tensor]:
    """AutoAWQ {qweight, qzeros, scales} -> kiln's {qweight [N, K/2], zeros [N, K/g], scales [N, K/g]}.

    group_size is kiln's (0: one group per row); `name` (the layer) is for the error messages."""
    qweight, qzeros, scales = (parts[k] for k in AWQ_PARTS)
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise KilnError(f"{name}: qweight/qzeros are {qweight.dtype}/{qzeros.dtype}, AutoAWQ GEMM packs int32")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    groups = k // group_size if group_size else 1
    want = {"qweight": (k, n // 8), "qzeros": (groups, n // 8), "scales": (groups, n)}
    for key, tensor in zip(AWQ_PARTS, (qweight, qzeros, scales)):
        if tuple(tensor.shape) != want[key] or (group_size and k % group_size):
            raise KilnError(f"{name}.{key} has shape {tuple(tensor.shape)}, expected {want[key]} for "
                            f"in_features {k}, group_size {group_size or -1}; the folder is not AutoAWQ GEMM")
    return {
        "qweight": pack_int4(unpack_awq(qweight).T).contiguous(),  # [N, K // 2]
        "zeros": unpack_awq(qzeros).T.contiguous(),  # [N, groups]
        "scales": scales.T.contiguous(),  # [N, groups]
    }


# ---- the quantization_config -----------------------------------------------------------------------

def prequantized_config(model_dir: Path) -> dict[str, Any] | None:
    """The quantization settings a Hugging Face folder declares (config.json, else quant_config.json)."""
    qc = read_json(model_dir / "config.json", "--model_dir").get("quantization_config")
    if qc is None and (model_dir / "quant_config.json").is_file():  # AutoAWQ before transformers knew AWQ
        qc = dict(read_json(model_dir / "quant_config.json", "--model_dir"), quant_method="awq")
    if qc is not None and not isinstance(qc, dict):
        raise KilnError(f"--model_dir {model_dir}: config.json's quantization_config must be a JSON object")
    return qc


def awq_quant_config(qc: dict[str, Any]) -> QuantConfig:
    """Check an AutoAWQ quantization_config and return kiln's QuantConfig; KilnError for what kiln lacks."""
    checks = [
        ("quant_method", str(qc.get("quant_method", "")).lower(), "awq"),
        ("bits", qc.get("bits", qc.get("w_bit", 4)), 4),
        ("version", str(qc.get("version", "gemm")).lower(), "gemm"),
        ("zero_point", qc.get("zero_point", True), True),
    ]
    for key, value, wanted in checks:
        if value != wanted:
            raise KilnError(f"config.json: quantization_config {key} {qc.get(key, value)!r} is not supported; "
                            f"{SUPPORTED} (or convert the unquantized model)")
    group = qc.get("group_size", qc.get("q_group_size", 128))
    if not isinstance(group, int) or isinstance(group, bool) or (group < 1 and group != -1):
        raise KilnError(f"config.json: quantization_config group_size {group!r} is invalid: "
                        "it must be a positive integer or -1 (one group per row)")
    return QuantConfig("int4_awq", 0 if group == -1 else group)


# ---- a whole folder --------------------------------------------------------------------------------

def iter_kiln_tensors(files: list[Path], quant: QuantConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream an AutoAWQ folder's tensors as kiln's: each linear's 3 parts (in any file) become
    prefix.qweight/zeros/scales; everything else passes unchanged."""
    pending: dict[str, dict[str, torch.Tensor]] = {}  # layer -> parts seen so far
    for name, tensor in iter_tensors(files):
        prefix, _, part = name.rpartition(".")
        if is_quantized_linear(name):
            raise KilnError(f"{name} is not quantized (modules_to_not_convert?); kiln's int4_awq needs every "
                            f"decoder projection ({', '.join(LINEAR_NAMES)}) quantized")
        if part not in AWQ_PARTS:
            yield name, tensor
            continue
        parts = pending.setdefault(prefix, {})
        parts[part] = tensor
        if len(parts) == len(AWQ_PARTS):
            del pending[prefix]
            for key, value in import_autoawq_linear(parts, quant.group_size, prefix).items():
                yield f"{prefix}.{key}", value
    for prefix, parts in pending.items():
        missing = [p for p in AWQ_PARTS if p not in parts]
        raise KilnError(f"{prefix}: {', '.join(missing)} missing from the AutoAWQ folder; finish the download")


def import_autoawq(
    model_dir: str | Path,
    output_dir: str | Path,
    dtype: str = "float16",
    tp_size: int = 1,
    extra_files: list[Path] = (),  # type: ignore[assignment]
    requested: QuantConfig | None = None,
) -> Path:
    """An AutoAWQ GEMM folder -> a kiln int4_awq checkpoint with the very same integers, zeros and scales.

    Scales (float16 in the folder) and the float tensors are cast to `dtype`: float16 or float32 keep
    the scales exactly. `requested`: a quantization asked for on top, refused (it would re-quantize)."""
    from kiln.checkpoint.convert import read_hf_config, write_checkpoint

    model_dir = require_dir(model_dir, "--model_dir")
    qc = prequantized_config(model_dir)
    if qc is None:
        raise KilnError(f"--model_dir {model_dir}: config.json has no quantization_config; it is not AutoAWQ")
    quant = awq_quant_config(qc)
    if requested is not None and requested.algo:
        raise KilnError(f"--model_dir {model_dir} is already quantized (AutoAWQ int4, group_size "
                        f"{quant.group_size or -1}) and converts as is to int4_awq: drop --use_weight_only "
                        f"(or the {requested.algo} --qformat), which would quantize it again")
    cfg = read_hf_config(model_dir)
    tensors = iter_kiln_tensors(hf_weight_files(model_dir), quant)
    source = f"{model_dir.resolve()} ({time.strftime('%Y-%m-%d %H:%M:%S')}), AutoAWQ GEMM"
    return write_checkpoint(cfg, tensors, output_dir, dtype, tp_size, quant, extra_files, source,
                            f"--model_dir {model_dir}", prequantized=True)


# ---- export ----------------------------------------------------------------------------------------

def awq_config_entry(group_size: int) -> dict[str, Any]:
    """config.json's quantization_config, as AutoAWQ writes it (kiln group 0 -> AutoAWQ -1)."""
    return {"quant_method": "awq", "zero_point": True, "group_size": group_size or -1, "bits": 4,
            "version": "gemm", "modules_to_not_convert": None}


def write_autoawq(
    tensors: Iterable[tuple[str, torch.Tensor]], hf_config: dict[str, Any], group_size: int,
    output_dir: str | Path, extra_files: Iterable[Path] = (),
) -> Path:
    """kiln-layout tensors (linears as prefix.qweight/zeros/scales) -> an AutoAWQ folder, written atomically:
    config.json (hf_config + quantization_config, float16) and model.safetensors, all floats in float16."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        prefix, _, part = name.rpartition(".")
        if part in ("qweight", "zeros", "scales") and prefix.split(".")[-1] in LINEAR_NAMES:
            pending.setdefault(prefix, {})[part] = tensor
            if len(pending[prefix]) == 3:
                out.update({f"{prefix}.{k}": v for k, v in export_autoawq(pending.pop(prefix)).items()})
        else:
            out[name] = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
    if pending:
        raise KilnError(f"{next(iter(pending))}: not an int4 linear (qweight, zeros and scales needed)")
    config = dict(hf_config, quantization_config=awq_config_entry(group_size), torch_dtype="float16")
    config.pop("dtype", None)
    with atomic_dir(Path(output_dir)) as tmp:
        save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for extra in extra_files:
            shutil.copy2(extra, tmp / extra.name)
    return Path(output_dir)


def export_checkpoint(ckpt_dir: str | Path, output_dir: str | Path) -> Path:
    """A kiln int4_awq checkpoint of tp_size 1 -> an AutoAWQ folder (tokenizer files copied if present).

    Scales are stored in float16 as AutoAWQ does: exact for a float16 checkpoint, rounded otherwise."""
    ckpt_dir = require_dir(ckpt_dir, "--checkpoint_dir")
    ckpt = load_config(ckpt_dir)
    quant = QuantConfig.from_dict(ckpt.quantization)
    if quant.algo != "int4_awq" or ckpt.tp_size != 1:
        raise KilnError(f"--checkpoint_dir {ckpt_dir}: is {quant.algo or 'full_prec'} with tp_size "
                        f"{ckpt.tp_size}; AutoAWQ export needs an int4_awq checkpoint of tp_size 1")
    extras = tokenizer_files(ckpt_dir)
    tensors = iter_tensors([ckpt_dir / "rank0.safetensors"])
    return write_autoawq(tensors, hf_config(ckpt.model), quant.group_size, output_dir, extras)


def quantize_to_autoawq(model_dir: str | Path, output_dir: str | Path, group_size: int = 128) -> Path:
    """A float Hugging Face folder -> an AutoAWQ folder, each linear quantized round-to-nearest
    (kiln's int4_awq quantizer, no calibration), everything else in float16."""
    model_dir = require_dir(model_dir, "--model_dir")
    hf = read_json(model_dir / "config.json", "--model_dir")
    ModelConfig.from_hf(hf)  # refuse what kiln does not run before the work
    quant = QuantConfig("int4_awq", group_size)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in iter_tensors(hf_weight_files(model_dir)):
            yield from (quantize_weight(name, t, quant, torch.float16).items() if is_quantized_linear(name)
                        else [(name, t)])

    extras = tokenizer_files(model_dir)
    return write_autoawq(tensors(), hf, group_size, output_dir, extras)


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A Hugging Face config.json that ModelConfig.from_hf reads back as `cfg` (checked)."""
    hf: dict[str, Any] = {
        "architectures": [cfg.architecture], "model_type": _MODEL_TYPES[cfg.architecture],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope.theta,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.qkv_bias, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_id,
    }
    if cfg.rope.rope_type != "default":
        hf["rope_scaling"] = {"rope_type": cfg.rope.rope_type, "factor": cfg.rope.factor,
                              "low_freq_factor": cfg.rope.low_freq_factor,
                              "high_freq_factor": cfg.rope.high_freq_factor,
                              "original_max_position_embeddings": cfg.rope.original_max_position_embeddings}
    if any(cfg.sliding_windows):
        hf.update(sliding_window=max(cfg.sliding_windows), use_sliding_window=True,
                  layer_types=["sliding_attention" if w else "full_attention" for w in cfg.sliding_windows])
    if ModelConfig.from_hf(hf) != cfg:
        raise KilnError(f"this {cfg.architecture} checkpoint has no Hugging Face config.json equivalent; "
                        "export it from the original Hugging Face folder instead")
    return hf


_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
