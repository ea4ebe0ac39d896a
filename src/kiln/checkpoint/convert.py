"""Hugging Face model folder -> kiln checkpoint (cast to the chosen dtype, sharded per rank)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from kiln.checkpoint.format import CheckpointConfig, save_config, torch_dtype
from kiln.checkpoint.safetensors_io import hf_weight_files, iter_tensors
from kiln.config import ModelConfig
from kiln.distributed.comm import TPGroup
from kiln.errors import KilnError
from kiln.fsutil import atomic_dir, read_json, require_dir
from kiln.models.registry import create_model


def read_hf_config(model_dir: Path) -> ModelConfig:
    return ModelConfig.from_hf(read_json(model_dir / "config.json", "--model_dir"))


def convert_hf(
    model_dir: str | Path,
    output_dir: str | Path,
    dtype: str = "float16",
    tp_size: int = 1,
    extra_files: list[Path] = (),  # type: ignore[assignment]
) -> Path:
    """Write a checkpoint of `tp_size` ranks; returns its folder. `extra_files` are copied in as is."""
    model_dir = require_dir(model_dir, "--model_dir")
    if tp_size < 1:
        raise KilnError(f"--tp_size {tp_size} is invalid: it must be 1 or more")
    cfg = read_hf_config(model_dir)
    target_dtype = torch_dtype(dtype)
    files = hf_weight_files(model_dir)
    models = [create_model(cfg, 1, "meta", TPGroup(r, tp_size)) for r in range(tp_size)]
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp_size)]
    for name, tensor in iter_tensors(files):
        try:
            targets = [m.checkpoint_target(name) for m in models]
        except KeyError:
            raise KilnError(f"--model_dir {model_dir}: unexpected tensor {name!r} for {cfg.architecture}") from None
        if targets[0] is None:
            continue
        tensor = tensor.to(target_dtype)
        for rank, (module, param, shard_id) in enumerate(targets):  # type: ignore[misc]
            try:
                shards[rank][name] = module.shard(param, tensor, shard_id)
            except ValueError as e:
                raise KilnError(
                    f"--model_dir {model_dir}: tensor {name!r} of shape {tuple(tensor.shape)} does not fit "
                    f"{cfg.architecture} with --tp_size {tp_size} ({e})"
                ) from None
    _check_complete(models[0], shards[0], model_dir)
    out = Path(output_dir)
    with atomic_dir(out) as tmp:
        for rank, tensors in enumerate(shards):
            save_file(tensors, str(tmp / f"rank{rank}.safetensors"), metadata={"format": "pt"})
        source = f"{model_dir.resolve()} ({time.strftime('%Y-%m-%d %H:%M:%S')})"
        save_config(tmp, CheckpointConfig(model=cfg, dtype=dtype, tp_size=tp_size, source=source))
        for extra in extra_files:
            shutil.copy2(extra, tmp / extra.name)
    return out


def _check_complete(model: torch.nn.Module, tensors: dict[str, torch.Tensor], model_dir: Path) -> None:
    """Every runtime parameter must be fed by some checkpoint tensor."""
    fed = set()
    for name in tensors:
        module, param, _ = model.checkpoint_target(name)  # type: ignore[attr-defined, misc]
        fed.add(id(getattr(module, param)))
    missing = [n for n, p in model.named_parameters() if id(p) not in fed]
    if missing:
        raise KilnError(f"--model_dir {model_dir}: weights missing for {', '.join(missing[:5])}")
