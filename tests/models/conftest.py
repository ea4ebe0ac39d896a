"""Fixtures of the model-parity suite; the helpers they use live in model_parity.py."""

from __future__ import annotations

import pytest
from model_parity import HFModel, make_hf_model

from kiln.checkpoint.convert import convert_hf


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    """Tiny tensors: one intra-op thread (tests/conftest.py)."""


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
