"""Streaming reads of safetensors files, with clear errors for missing or corrupt ones."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kiln.errors import KilnError


def iter_tensors(files: list[Path], device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time from each file, so peak memory stays near one tensor."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device=device) as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError, json.JSONDecodeError) as e:
            raise KilnError(f"{path} is not a readable safetensors file ({e}); re-create or re-download it") from None


def hf_weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model folder (sharded with an index, or single)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise KilnError(f"{index} is not a valid safetensors index ({e})") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise KilnError(f"{index} names missing files: {', '.join(missing)}; finish the download")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        bins = list(model_dir.glob("*.bin")) + list(model_dir.glob("*.pth"))
        hint = " (only PyTorch .bin/.pth weights found: re-save them as safetensors)" if bins else ""
        raise KilnError(f"--model_dir {model_dir}: no *.safetensors weights{hint}")
    return files
