"""Hugging Face model folder -> kiln checkpoint (cast to the chosen dtype, sharded per rank)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from kiln.checkpoint.autoawq import import_autoawq, prequantized_config
from kiln.checkpoint.format import CheckpointConfig, save_config, torch_dtype
from kiln.checkpoint.safetensors_io import hf_weight_files, iter_tensors
from kiln.config import ModelConfig
from kiln.distributed.comm import TPGroup
from kiln.errors import KilnError
from kiln.fsutil import atomic_dir, read_json, require_dir, require_distinct
from kiln.models.registry import create_model
from kiln.quant.methods import QuantConfig
from kiln.quant.rtn import is_quantized_linear, quantize_weight


def read_hf_config(model_dir: Path) -> ModelConfig:
    return ModelConfig.from_hf(read_json(model_dir / "config.json", "--model_dir"))


def convert_hf(
    model_dir: str | Path,
    output_dir: str | Path,
    dtype: str = "float16",
    tp_size: int = 1,
    extra_files: list[Path] = (),  # type: ignore[assignment]
    quant: QuantConfig | None = None,
) -> Path:
    """Write a checkpoint of `tp_size` ranks; returns its folder. `extra_files` are copied in as is.

    With `quant`, linear weights are quantized round-to-nearest as they stream through. A folder that
    is already quantized (config.json's quantization_config) goes through the AutoAWQ reader instead.
    """
    model_dir = require_dir(model_dir, "--model_dir")
    require_distinct(model_dir, output_dir, "--model_dir")
    if prequantized_config(model_dir) is not None:
        return import_autoawq(model_dir, output_dir, dtype, tp_size, extra_files, quant)
    cfg = read_hf_config(model_dir)
    files = hf_weight_files(model_dir)
    source = f"{model_dir.resolve()} ({time.strftime('%Y-%m-%d %H:%M:%S')})"
    return write_checkpoint(
        cfg, iter_tensors(files), output_dir, dtype, tp_size, quant, extra_files, source, f"--model_dir {model_dir}"
    )


def write_checkpoint(
    cfg: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    output_dir: str | Path,
    dtype: str,
    tp_size: int,
    quant: QuantConfig | None = None,
    extra_files: list[Path] = (),  # type: ignore[assignment]
    source: str = "",
    where: str = "the model",
    prequantized: bool = False,
) -> Path:
    """Cast (and quantize, unless `prequantized`), shard per rank and write the checkpoint atomically."""
    if tp_size < 1:
        raise KilnError(f"--tp_size {tp_size} is invalid: it must be 1 or more")
    quant = quant or QuantConfig()
    target_dtype = torch_dtype(dtype)
    try:
        models = [create_model(cfg, 1, "meta", TPGroup(r, tp_size), quant) for r in range(tp_size)]
    except ValueError as e:  # the layers refuse a model that does not split into tp_size ranks
        raise KilnError(f"--tp_size {tp_size} does not fit {cfg.architecture}: {e}") from None
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp_size)]
    for src_name, src_tensor in tensors:
        if quant.algo and not prequantized and is_quantized_linear(src_name):
            parts = quantize_weight(src_name, src_tensor, quant, target_dtype, tp_size)
        else:
            parts = {src_name: src_tensor if prequantized and not src_tensor.is_floating_point()
                     else src_tensor.to(target_dtype)}
        for name, tensor in parts.items():
            _add_to_shards(models, shards, name, tensor, cfg, where, tp_size)
    missing = models[0].missing_parameters(list(shards[0]))
    if missing:
        raise KilnError(f"{where}: weights missing for {', '.join(missing[:5])}")
    out = Path(output_dir)
    with atomic_dir(out) as tmp:
        for rank, rank_tensors in enumerate(shards):
            save_file(rank_tensors, str(tmp / f"rank{rank}.safetensors"), metadata={"format": "pt"})
        ckpt = CheckpointConfig(model=cfg, dtype=dtype, tp_size=tp_size, quantization=quant.to_dict(), source=source)
        save_config(tmp, ckpt)
        for extra in extra_files:
            shutil.copy2(extra, tmp / extra.name)
    return out


def _add_to_shards(models, shards, name, tensor, cfg, where, tp_size) -> None:  # noqa: ANN001
    try:
        targets = [m.checkpoint_target(name) for m in models]
    except KeyError:
        raise KilnError(f"{where}: unexpected tensor {name!r} for {cfg.architecture}") from None
    if targets[0] is None:
        return
    for rank, (module, param, shard_id) in enumerate(targets):  # type: ignore[misc]
        try:
            shards[rank][name] = module.shard(param, tensor, shard_id)
        except ValueError as e:
            raise KilnError(
                f"{where}: tensor {name!r} of shape {tuple(tensor.shape)} does not fit "
                f"{cfg.architecture} with --tp_size {tp_size} ({e})"
            ) from None
