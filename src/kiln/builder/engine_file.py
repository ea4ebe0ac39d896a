"""The engine folder: engine.json + rank{i}.safetensors in the runtime layout. See docs/formats.md."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import kiln
from kiln.builder.device import check_runnable
from kiln.config import BuildConfig, ModelConfig
from kiln.errors import KilnError
from kiln.fsutil import read_json, require_dir, write_json

ENGINE_FORMAT = "kiln-engine/1"


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    build: BuildConfig
    dtype: str
    tp_size: int
    device: dict[str, Any]
    quantization: dict[str, Any]
    flags: dict[str, Any]
    versions: dict[str, str]
    tuning: dict[str, Any] | None = None  # kernel choices measured on the build GPU (kernels/tuning.py)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ENGINE_FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": self.versions,
            "device": self.device,
            "dtype": self.dtype,
            "mapping": {"world_size": self.tp_size, "tp_size": self.tp_size},
            "build": self.build.to_dict(),
            "flags": self.flags,
            "quantization": self.quantization,
            "model": self.model.to_dict(),
            "tuning": self.tuning,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineConfig:
        return cls(
            model=ModelConfig.from_dict(d["model"]),
            build=BuildConfig.from_dict(d["build"]),
            dtype=d["dtype"],
            tp_size=int(d["mapping"]["tp_size"]),
            device=d["device"],
            quantization=d.get("quantization", {"quant_algo": None}),
            flags=d.get("flags", {}),
            versions=d.get("versions", {}),
            tuning=d.get("tuning"),
        )


def current_versions() -> dict[str, str]:
    return {"kiln": kiln.__version__, "torch": torch.__version__, "python": platform.python_version()}


def save_engine_config(folder: Path, cfg: EngineConfig) -> None:
    write_json(folder / "engine.json", cfg.to_dict())


def load_engine_config(engine_dir: str | Path, device: str | None = None) -> EngineConfig:
    """Read engine.json; when `device` is given, refuse an engine built for another kind of device."""
    folder = require_dir(engine_dir, "--engine_dir")
    data = read_json(folder / "engine.json", "--engine_dir")
    if data.get("format") != ENGINE_FORMAT:
        raise KilnError(
            f"--engine_dir {folder}: engine.json has format {data.get('format')!r}, expected "
            f"{ENGINE_FORMAT!r}; rebuild the engine with `kiln build`"
        )
    try:
        cfg = EngineConfig.from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        raise KilnError(f"--engine_dir {folder}: engine.json is damaged ({e!r}); rebuild with `kiln build`") from None
    for rank in range(cfg.tp_size):
        if not (folder / f"rank{rank}.safetensors").is_file():
            raise KilnError(f"--engine_dir {folder}: rank{rank}.safetensors is missing; rebuild with `kiln build`")
    if device is not None:
        check_runnable(cfg.device, device, str(folder))
    return cfg
