"""Fixtures of the model-parity suite; the helpers they use live in parity.py."""

from __future__ import annotations

import pytest

from kiln.checkpoint.convert import convert_hf
from parity import HFModel, make_hf_model


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """hf_model(name) -> HFModel: the variant's random model, saved and converted once per session."""
    cache: dict[str, HFModel] = {}

    def get(name: str) -> HFModel:
        if name not in cache:
            work = tmp_path_factory.mktemp(name)
            model = make_hf_model(name)
            model.save_pretrained(work / "hf")
            convert_hf(work / "hf", work / "ckpt", dtype="float32", tp_size=1)
            cache[name] = HFModel(name, model, work / "hf", work / "ckpt", work)
        return cache[name]

    return get
