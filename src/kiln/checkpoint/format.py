"""The checkpoint folder: config.json + rank{i}.safetensors, weights sharded per tensor-parallel rank.

Device-independent; tensor names are Hugging Face's, each holding this rank's slice. See docs/formats.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import kiln
from kiln.config import DTYPES, ModelConfig
from kiln.errors import KilnError
from kiln.fsutil import read_json, write_json

CHECKPOINT_FORMAT = "kiln-checkpoint/1"


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise KilnError(f"--dtype {name!r} is invalid: choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


@dataclass(frozen=True)
class CheckpointConfig:
    model: ModelConfig
    dtype: str
    tp_size: int = 1
    quantization: dict[str, Any] = field(default_factory=lambda: {"quant_algo": None})
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "kiln_version": kiln.__version__,
            "architecture": self.model.architecture,
            "dtype": self.dtype,
            "mapping": {"world_size": self.tp_size, "tp_size": self.tp_size},
            "quantization": self.quantization,
            "source": self.source,
            "model": self.model.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointConfig:
        return cls(
            model=ModelConfig.from_dict(d["model"]),
            dtype=d["dtype"],
            tp_size=int(d["mapping"]["tp_size"]),
            quantization=d.get("quantization", {"quant_algo": None}),
            source=d.get("source", ""),
        )


def save_config(folder: Path, cfg: CheckpointConfig) -> None:
    write_json(folder / "config.json", cfg.to_dict())


def load_config(folder: Path) -> CheckpointConfig:
    data = read_json(folder / "config.json", "--checkpoint_dir")
    if data.get("format") != CHECKPOINT_FORMAT:
        raise KilnError(
            f"--checkpoint_dir {folder}: config.json is not a kiln checkpoint (format "
            f"{data.get('format')!r}, expected {CHECKPOINT_FORMAT!r}); create one with `kiln convert`"
        )
    try:
        cfg = CheckpointConfig.from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        raise KilnError(f"--checkpoint_dir {folder}: config.json is damaged ({e!r}); re-run `kiln convert`") from None
    for rank in range(cfg.tp_size):
        if not (folder / f"rank{rank}.safetensors").is_file():
            raise KilnError(f"--checkpoint_dir {folder}: rank{rank}.safetensors is missing; re-run `kiln convert`")
    return cfg
