"""ProcessAsyncLLM: the step loop in a spawned process gives the tokens of the in-process engine, frees
the blocks of an aborted request, and fails open requests clearly when its process dies."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from kiln.builder.build import build_engine
from kiln.checkpoint.convert import convert_hf
from kiln.config import BuildConfig, SamplingParams
from kiln.errors import KilnError
from kiln.runtime.async_engine import EngineDead
from kiln.runtime.engine import LLM
from kiln.runtime.engine_process import EngineSpec, ProcessAsyncLLM
from kiln.runtime.loader import ModelSource

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [5, 6, 7, 8, 9, 40, 41]]


@pytest.fixture(scope="module")
def engine_dir(tiny_llama_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("engine-process")
    convert_hf(tiny_llama_hf, tmp / "ckpt", "float32")
    build_engine(tmp / "ckpt", tmp / "engine", BuildConfig(max_batch_size=4, max_input_len=32, max_seq_len=64,
                                                           max_num_tokens=64, tokens_per_block=4))
    return tmp / "engine"


async def collect(engine: ProcessAsyncLLM, prompt: list[int], params: SamplingParams) -> list[int]:
    outputs = [out async for out in engine.generate(prompt, params)]
    assert outputs and outputs[-1].finished
    return outputs[-1].output_ids


def test_process_engine_matches_the_in_process_one_and_dies_clearly(engine_dir: Path) -> None:
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = [o.output_ids for o in LLM(engine_dir, device="cpu").generate(PROMPTS, params)]
    engine = ProcessAsyncLLM(EngineSpec("cpu", ModelSource(engine_dir=str(engine_dir))))
    try:
        assert engine.alive and engine.llm.config.build.max_seq_len == 64

        async def scenario() -> None:
            got = await asyncio.gather(*(collect(engine, p, params) for p in PROMPTS))
            assert list(got) == expected
            long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
            stream = engine.generate(PROMPTS[0], long)
            async for out in stream:
                if len(out.output_ids) >= 2:
                    break
            await stream.aclose()  # leaving early aborts the request
            for _ in range(100):
                await asyncio.sleep(0.05)
                if engine.llm.blocks.num_used == 0 and not engine.llm.scheduler.running:
                    break
            assert engine.llm.blocks.num_used == 0
            assert engine.stats.steps > 0 and engine.llm.blocks.hit_rate > 0  # PROMPTS[2] shares a prefix
            with pytest.raises(KilnError):
                engine.submit([1] * 33, params)  # over max_input_len: refused in the server's process
            os.kill(engine._proc.pid, signal.SIGKILL)
            with pytest.raises(EngineDead):
                await collect(engine, PROMPTS[1], long)
            for _ in range(100):
                if not engine.alive:
                    break
                await asyncio.sleep(0.05)
            assert not engine.alive and "exit code" in (engine.error or "")

        asyncio.run(scenario())
    finally:
        engine.shutdown()
