"""Checkpoint -> engine: fuse each rank's weights into the runtime layout and record the build limits.

The runtime then loads an engine rank with one `load_state_dict(assign=True)`, no reshaping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kiln.builder.device import describe_device
from kiln.builder.engine_file import EngineConfig, current_versions, save_engine_config
from kiln.checkpoint.format import CheckpointConfig, load_config, torch_dtype
from kiln.checkpoint.safetensors_io import iter_tensors
from kiln.config import BuildConfig
from kiln.distributed.comm import TPGroup
from kiln.errors import KilnError
from kiln.fsutil import atomic_dir, require_dir, require_distinct
from kiln.models.registry import create_model
from kiln.quant.methods import QuantConfig


def build_engine(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    build: BuildConfig,
    device: str = "cpu",
    flags: dict[str, Any] | None = None,
    workers: int = 1,
) -> EngineConfig:
    """Build an engine for `device` from a kiln checkpoint; returns the engine's config. `workers` ranks
    are fused at once, each in a process of its own (building a model sets torch's default dtype, a
    setting of the whole process, so threads would mix up their ranks' dtypes)."""
    ckpt_dir = require_dir(checkpoint_dir, "--checkpoint_dir")
    require_distinct(ckpt_dir, output_dir, "--checkpoint_dir")
    ckpt = load_config(ckpt_dir)
    if device.startswith("cuda"):
        check_gpu_limits(build, ckpt.model.head_dim)
    if build.max_seq_len > ckpt.model.max_position_embeddings:
        print(
            f"warning: --max_seq_len {build.max_seq_len} is beyond the model's trained context "
            f"({ckpt.model.max_position_embeddings} positions); quality may drop past it"
        )
    tuning = None
    quant = QuantConfig.from_dict(ckpt.quantization)
    if device.startswith("cuda") and quant.algo is not None:
        from kiln.kernels.tuning import tune

        print(f"tuning the {quant.algo} kernels for this GPU ...")
        tuning = tune(ckpt.model, quant, build, torch_dtype(ckpt.dtype), device, ckpt.tp_size).to_dict()
    cfg = EngineConfig(
        model=ckpt.model,
        build=build,
        dtype=ckpt.dtype,
        tp_size=ckpt.tp_size,
        device=describe_device(device),
        quantization=ckpt.quantization,
        flags=flags or {},
        versions=current_versions(),
        tuning=tuning,
    )
    with atomic_dir(output_dir) as tmp:
        if workers > 1 and ckpt.tp_size > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(min(workers, ckpt.tp_size), mp_context=mp.get_context("spawn")) as pool:
                jobs = [pool.submit(_build_rank, ckpt_dir, ckpt, rank, tmp) for rank in range(ckpt.tp_size)]
                for job in jobs:
                    job.result()  # re-raises a rank's error (a KilnError reaches the user as one line)
        else:
            for rank in range(ckpt.tp_size):
                _build_rank(ckpt_dir, ckpt, rank, tmp)
        save_engine_config(tmp, cfg)
    return cfg


def check_gpu_limits(build: BuildConfig, head_dim: int) -> None:
    """What the GPU kernels need of an engine's shape: their KV tiles are whole cache blocks."""
    bs = build.tokens_per_block
    if bs < 8 or bs > 256 or bs & (bs - 1):
        raise KilnError(
            f"--tokens_per_block {bs} is not supported on the GPU: it must be a power of two from 8 to 256 "
            "(the attention kernels read whole cache blocks); 64 is the default"
        )
    if head_dim > 256:
        raise KilnError(f"the model's head_dim {head_dim} is above 256, the largest the GPU attention kernels take")


def _build_rank(ckpt_dir: Path, ckpt: CheckpointConfig, rank: int, folder: Path) -> None:
    tensors = _fuse_rank(ckpt_dir, ckpt, rank)
    save_file(tensors, str(folder / f"rank{rank}.safetensors"), metadata={"format": "pt"})


def _fuse_rank(ckpt_dir: Path, ckpt: CheckpointConfig, rank: int) -> dict[str, torch.Tensor]:
    quant = QuantConfig.from_dict(ckpt.quantization)
    model = create_model(ckpt.model, 1, "meta", TPGroup(rank, ckpt.tp_size), quant, torch_dtype(ckpt.dtype))
    model.to_empty(device="cpu")
    path = ckpt_dir / f"rank{rank}.safetensors"
    names = []
    for name, tensor in iter_tensors([path]):
        try:
            target = model.checkpoint_target(name)
        except KeyError:
            raise KilnError(f"{path}: unexpected tensor {name!r}; re-create the checkpoint") from None
        if target is None:
            continue
        module, param, shard_id = target
        try:
            module.weight_loader(param, tensor, shard_id)
        except ValueError as e:
            raise KilnError(f"{path}: tensor {name!r} does not fit the model ({e}); re-create the checkpoint") from None
        names.append(name)
    missing = model.missing_parameters(names)
    if missing:
        raise KilnError(f"{path}: no weights for {', '.join(missing[:5])}; re-create the checkpoint")
    return {k: v.contiguous() for k, v in model.state_dict().items()}
