"""Engine folder -> a ready model on the device, streamed tensor by tensor onto a meta-built model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kiln.builder.engine_file import EngineConfig, load_engine_config
from kiln.checkpoint.format import torch_dtype
from kiln.checkpoint.safetensors_io import iter_tensors
from kiln.config import BuildConfig
from kiln.distributed.comm import SINGLE, TPGroup
from kiln.errors import KilnError
from kiln.models.llama import LlamaForCausalLM
from kiln.models.registry import create_model
from kiln.quant.methods import QuantConfig


def load_engine(
    engine_dir: str | Path, device: str, tp: TPGroup = SINGLE
) -> tuple[LlamaForCausalLM, EngineConfig]:
    cfg = load_engine_config(engine_dir, device)
    if cfg.tp_size != tp.size:
        raise KilnError(f"--engine_dir {engine_dir} has {cfg.tp_size} ranks but {tp.size} processes were started")
    quant = QuantConfig.from_dict(cfg.quantization)
    model = create_model(cfg.model, cfg.build.max_seq_len, device, tp, quant, torch_dtype(cfg.dtype))
    path = Path(engine_dir) / f"rank{tp.rank}.safetensors"
    state = dict(iter_tensors([path], device=device))
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise KilnError(f"{path} does not match engine.json ({first}); rebuild the engine") from None
    return model.eval(), cfg


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: an engine folder, or random weights of a known model's shapes
    (benchmarks). Picklable: rank 0 sends it to the other ranks, a server to its engine process."""

    engine_dir: str | None = None
    synthetic: str | None = None
    build: BuildConfig | None = None
    qformat: str = "full_prec"
    dtype: str = "bfloat16"
    synthetic_tp_size: int = 1
    group_size: int = 128  # of synthetic int4/int8 weights

    @property
    def tp_size(self) -> int:
        if self.engine_dir is not None:
            return load_engine_config(self.engine_dir).tp_size
        return self.synthetic_tp_size

    def load(self, device: str, tp: TPGroup = SINGLE) -> tuple[LlamaForCausalLM, EngineConfig]:
        if self.engine_dir is not None:
            return load_engine(self.engine_dir, device, tp)
        from kiln.bench.synthetic import synthetic_model

        quant = None if self.qformat == "full_prec" else QuantConfig(self.qformat, 0 if self.qformat == "fp8" else self.group_size)
        return synthetic_model(self.synthetic or "", self.build or BuildConfig(), device, self.dtype, quant, tp=tp)
