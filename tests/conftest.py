"""Fixtures shared by every test folder: the real SmolLM2 model folder, and a tiny random Llama."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_hf() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (converted once from the GGUF, cached in KILN_HOME)."""
    from kiln.assets import smollm2_hf_dir

    return smollm2_hf_dir()


@pytest.fixture(scope="session")
def tiny_llama_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (GQA, untied) saved as a Hugging Face folder, with SmolLM2's tokenizer
    vocabulary size replaced by a tiny one; no tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.1, tie_word_embeddings=False,
    )
    folder = tmp_path_factory.mktemp("tiny-llama-hf")
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: extra intra-op threads only spin, and on a loaded 2-core machine
    they make a module several times slower. Use with `pytestmark = pytest.mark.usefixtures(...)`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Modules long enough to be a worker's whole share, that use no fixture of their folder's: scheduled alone.
OWN_SCOPE = {"tests/quant/test_quality.py", "tests/quant/test_quality_fp8.py"}


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`pytest -n N --dist loadscope` (make test) sends each test folder (tests/cli, tests/serve, ...)
    whole to one worker, instead of each module: a folder's session fixtures (the CLI's artifacts, the
    served engine) are then made once, not once per worker that runs some of its modules."""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByFolder(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            if path in OWN_SCOPE:
                return path
            return "/".join(path.split("/")[:2])

    return ByFolder(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The long modules first: a worker starts on one while the other works through the folders, instead
    # of taking it up last and running alone at the end.
    items.sort(key=lambda item: item.nodeid.split("::", 1)[0] not in OWN_SCOPE)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _threads_per_worker() -> int | None:
    """Under `pytest -n N` each worker gets its share of the cores: N processes each running torch with a
    thread per core oversubscribe the machine, and threads of one parallel region waiting for a thread
    that lost its core made the CPU-heavy modules several times slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2:
        return None
    return max(1, len(os.sched_getaffinity(0)) // workers)


if (_threads := _threads_per_worker()) is not None:
    os.environ["OMP_NUM_THREADS"] = str(_threads)  # the `kiln` subprocesses the tests start, too
    torch.set_num_threads(_threads)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, Triton kernels run in Triton's interpreter (on CPU tensors). The flag is read when a
# kernel is defined, so it is set here, before any test module imports kiln.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

