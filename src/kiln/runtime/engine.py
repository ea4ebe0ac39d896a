"""The LLM API: load an engine and a tokenizer, check requests against the build limits, generate.

    llm = LLM("engines/smollm2", "models/hf/smollm2")
    out = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))

`stream` yields text as it is produced; `generate` collects it. Both drive the same step loop:
scheduler -> model runner -> sampler -> scheduler, with every request batched in flight.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln.builder.device import default_device
from kiln.builder.engine_file import EngineConfig
from kiln.config import SamplingParams
from kiln.distributed.comm import SINGLE
from kiln.errors import KilnError, LimitError
from kiln.models.llama import LlamaForCausalLM
from kiln.runtime import steptrace
from kiln.runtime.kv_cache import BlockManager
from kiln.runtime.loader import ModelSource
from kiln.runtime.memory import num_kv_blocks
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.sampler import choose, on_device, sample
from kiln.runtime.scheduler import Batch, Scheduler
from kiln.runtime.sequence import Sequence
from kiln.runtime.tokenizer import TextStream, load_tokenizer

Prompt = str | list[int]


@dataclass
class RequestOutput:
    index: int
    prompt: Prompt
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    ttft_s: float = 0.0  # time to first token
    latency_s: float = 0.0  # arrival to last token


@dataclass
class StreamEvent:
    index: int  # which prompt
    delta: str  # new text
    token_ids: list[int]  # new tokens
    finished: bool
    output: RequestOutput


@dataclass
class _Step:
    """A launched step: what it computes, and its logits (on the device, maybe not computed yet)."""

    batch: Batch
    to_sample: list[Sequence]
    logits: torch.Tensor
    chosen: torch.Tensor | None = None  # the tokens, chosen on the device (sampler.choose), when they can be
    host: torch.Tensor | None = None  # `chosen` on its way to the host (CUDA)
    ready: Any = None  # CUDA event: `host` has arrived


def overlap_default() -> bool:
    """Steps overlap unless KILN_OVERLAP=0 (to compare, or to rule the overlap out)."""
    return os.environ.get("KILN_OVERLAP", "1") != "0"


@dataclass(frozen=True)
class RunnerSettings:
    """How the model runner and its KV cache are set up; the same on every rank."""

    num_kv_blocks: int | None = None
    cuda_graphs: bool = True
    kv_cache_free_gpu_memory_fraction: float | None = None
    max_tokens_in_paged_kv_cache: int | None = None


def prepare_runner(
    model: LlamaForCausalLM, config: EngineConfig, device: str, settings: RunnerSettings, group: Any = None,
) -> tuple[ModelRunner, int]:
    """Tune the kernels, size the KV cache (the smallest any rank can hold), capture the graphs."""
    if device.startswith("cuda"):  # before the CUDA graphs are captured: they keep the kernel choices
        from kiln.kernels.tuning import for_engine

        for_engine(model, config, device)
    blocks = settings.num_kv_blocks or num_kv_blocks(
        config, device, settings.kv_cache_free_gpu_memory_fraction, settings.max_tokens_in_paged_kv_cache)
    if group is not None:
        blocks = group.min_int(blocks)
    channel = group.channel if group is not None and group.rank == 0 else None
    runner = ModelRunner(model, config, device, blocks, settings.cuda_graphs, channel)
    runner.step_trace = steptrace.from_environment(group.rank if group is not None else 0, device)
    if runner.step_trace is not None:
        atexit.register(runner.step_trace.dump)
    return runner, blocks


class LLM:
    def __init__(
        self,
        engine_dir: str | Path,
        tokenizer_dir: str | Path | None = None,
        device: str | None = None,
        num_kv_blocks: int | None = None,
        cuda_graphs: bool = True,
        kv_cache_free_gpu_memory_fraction: float | None = None,
        max_tokens_in_paged_kv_cache: int | None = None,
        enable_prefix_caching: bool = True,
    ):
        settings = RunnerSettings(num_kv_blocks, cuda_graphs, kv_cache_free_gpu_memory_fraction,
                                  max_tokens_in_paged_kv_cache)
        tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
        self._load(ModelSource(engine_dir=str(engine_dir)), device, tokenizer, settings, enable_prefix_caching)

    @classmethod
    def from_source(
        cls, source: ModelSource, device: str | None = None, tokenizer: Any = None,
        enable_prefix_caching: bool = True, **settings: Any,
    ) -> LLM:
        """An LLM on an engine folder or a synthetic model (`ModelSource`), over as many ranks as it has."""
        llm = cls.__new__(cls)
        llm._load(source, device, tokenizer, RunnerSettings(**settings), enable_prefix_caching)
        return llm

    @classmethod
    def from_model(
        cls, model: LlamaForCausalLM, config: EngineConfig, device: str, tokenizer: Any = None,
        enable_prefix_caching: bool = True, **settings: Any,
    ) -> LLM:
        """An LLM around a single-rank model already in memory (tests)."""
        llm = cls.__new__(cls)
        llm._setup(model, config, device, tokenizer, RunnerSettings(**settings), enable_prefix_caching)
        return llm

    def _load(
        self, source: ModelSource, device: str | None, tokenizer: Any, settings: RunnerSettings,
        prefix_caching: bool,
    ) -> None:
        device = device or default_device()
        self.group = None
        from kiln.distributed import group as grp

        launched = grp.from_environment()
        if source.tp_size > 1 or (launched is not None and launched.world_size > 1):
            from kiln.distributed.worker import WorkerSetup

            kind = "cuda" if device.startswith("cuda") else "cpu"
            self.group, device = grp.start(source.tp_size, kind)
            self.group.broadcast_object(WorkerSetup(source, kind, settings))
            grp.trace(f"loading {source}")
        model, config = source.load(device, self.group.tp if self.group else SINGLE)
        self._setup(model, config, device, tokenizer, settings, prefix_caching)

    def _setup(
        self, model: LlamaForCausalLM, config: EngineConfig, device: str, tokenizer: Any,
        settings: RunnerSettings, prefix_caching: bool,
    ) -> None:
        self.device, self.model, self.config, self.tokenizer = device, model, config, tokenizer
        self.group = getattr(self, "group", None)
        self.runner, blocks = prepare_runner(model, config, device, settings, self.group)
        if self.group is not None:
            from kiln.distributed.group import trace

            trace("ready")
        self.blocks = BlockManager(blocks, config.build.tokens_per_block, prefix_caching)
        self.scheduler = Scheduler(config.build, self.blocks)
        self.overlap = overlap_default()
        self._inflight: _Step | None = None
        self.last_step_tokens = 0

    def close(self) -> None:
        """Release the other ranks of a tensor-parallel engine (also done when the process exits)."""
        if self.group is not None:
            self.group.close()

    # ---- requests --------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise KilnError("text prompts need a tokenizer: pass tokenizer_dir (--tokenizer_dir)")
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        return list(prompt)

    @property
    def default_end_id(self) -> int | None:
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        return tok_eos if tok_eos is not None else self.config.model.eos_token_id

    def make_sequence(self, prompt: Prompt, params: SamplingParams) -> Sequence:
        """Check one request against the engine's limits and turn it into a sequence."""
        ids = self.encode(prompt)
        build, vocab = self.config.build, self.config.model.vocab_size
        if not ids:
            raise KilnError("the prompt is empty: give at least one token")
        if len(ids) > build.max_input_len:
            raise LimitError(
                f"the prompt has {len(ids)} tokens, more than the engine's max_input_len "
                f"{build.max_input_len}: shorten it or rebuild with a larger --max_input_len"
            )
        if len(ids) + params.max_tokens > build.max_seq_len:
            raise LimitError(
                f"prompt ({len(ids)} tokens) + max output ({params.max_tokens}) = "
                f"{len(ids) + params.max_tokens} tokens is more than the engine's max_seq_len "
                f"{build.max_seq_len}: ask for at most {build.max_seq_len - len(ids)} output tokens "
                "or rebuild with a larger --max_seq_len"
            )
        if self.blocks.blocks_for(len(ids) + params.max_tokens) > self.blocks.num_blocks:
            raise LimitError(
                f"prompt ({len(ids)} tokens) + max output ({params.max_tokens}) needs more than the "
                f"{self.blocks.num_blocks * build.tokens_per_block} tokens the KV cache holds: ask for "
                "fewer tokens or give the cache more memory"
            )
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise KilnError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        if params.end_id is None and not params.ignore_eos:
            end_id = self.default_end_id
            others = tuple((e,) for e in self.config.model.eos_token_ids if e != end_id)
            params = dataclasses.replace(params, end_id=end_id, stop_token_ids=params.stop_token_ids + others)
        seq = Sequence(ids, params)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return seq

    # ---- generation ------------------------------------------------------------------------
    def stream(
        self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams]
    ) -> Iterator[StreamEvent]:
        """Generate for all prompts, in flight, yielding text as it is produced.

        One stream at a time per LLM: every step advances all running sequences, so a second stream
        would receive the first one's tokens.
        """
        if self.scheduler.has_work():
            raise KilnError("this LLM is already generating: finish (or close) the running stream first")
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or a single one for all")
        seqs = [self.make_sequence(p, sp) for p, sp in zip(prompts, plist)]  # all checked before any runs
        outputs = {s.seq_id: RequestOutput(i, p, s.prompt_ids) for i, (p, s) in enumerate(zip(prompts, seqs))}
        texts = {s.seq_id: TextStream(self.tokenizer, s.params.stop) if self.tokenizer else None for s in seqs}
        for seq in seqs:
            self.scheduler.add(seq)
        try:
            while any(not s.finished for s in seqs):
                for seq, new_ids in self.step():
                    yield self._event(seq, new_ids, outputs[seq.seq_id], texts[seq.seq_id])
        finally:
            for seq in seqs:
                self.scheduler.finish(seq, "cancelled")
            self.drain()

    def generate(
        self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        results: dict[int, RequestOutput] = {}
        for event in self.stream(prompts, params or SamplingParams()):
            results[event.index] = event.output
        return [results[i] for i in range(len(prompts))]

    # ---- steps -----------------------------------------------------------------------------
    # A step is launched, then collected: its tokens reach the host and are appended. With `overlap` (the
    # default), when a step's tokens are chosen on the device (greedy or drawn, with no penalties or log
    # probabilities to compute on the host: sampler.choose), the next step is scheduled and launched
    # before that step's tokens reach the host: each sequence starts past the tokens in flight, and the
    # one token the host does not have yet is copied on the device from the chosen ones. The host then
    # appends tokens, checks stops and hands out results while the device computes, instead of the
    # device waiting for the host between steps. New sequences are admitted into such steps as usual. A
    # sequence that ends at step n (an end id, a stop sequence, a cancel) was already in step n + 1: that
    # row's work is dropped (its token is never appended); one that ends by length is left out. A step
    # after one whose tokens the host picks, or that would need to preempt, is scheduled the plain way
    # after the collect. With tensor parallelism only greedy tokens are fed back (every rank computes
    # the same argmax; a draw happens on rank 0 alone).

    @torch.inference_mode()  # the sampler's penalties edit the runner's logits (inference tensors) in place
    def step(self) -> list[tuple[Sequence, list[int]]]:
        """Collect one step (launching it first if none is in flight); returns (sequence, its new token
        ids) for those that got one."""
        current = self._inflight or self._launch()
        self._inflight = None
        if self.overlap:
            self._inflight = self._launch_next(current)
        return self._collect(current)

    def _launch(self) -> _Step:
        batch = self.scheduler.schedule()
        if not batch:
            raise RuntimeError("no sequence could be scheduled: the KV cache is too small for a request")
        to_sample, logits = self._guarded(self.runner.run, batch)
        return self._choose_on_device(_Step(batch, to_sample, logits))

    def _launch_next(self, current: _Step) -> _Step | None:
        """The step after `current`, launched before `current`'s tokens are on the host; None when it
        must wait for them (see above)."""
        if current.chosen is None:
            return None
        pending = {seq.seq_id: n for seq, n in current.batch}
        prev_rows = {seq.seq_id: row for row, seq in enumerate(current.to_sample)}
        plan = self.scheduler.schedule_ahead(pending, set(prev_rows))
        if not plan or not plan[0]:
            return None
        batch, starts = plan
        to_sample, logits = self._guarded(self.runner.run_ahead, batch, starts, current.chosen, prev_rows)
        return self._choose_on_device(_Step(batch, to_sample, logits))

    def _choose_on_device(self, step: _Step) -> _Step:
        """Choose the step's tokens on the device (and start their copy to the host) when nothing but
        the logits decides them (no penalties, no log probabilities): the argmax, or a draw."""
        if not step.to_sample:
            return step
        if self.group is None and on_device(step.to_sample):
            step.chosen = choose(step.logits, step.to_sample)
        elif all(seq.params.plain_greedy for seq in step.to_sample):  # the other ranks can take it too
            step.chosen = step.logits.argmax(dim=-1)
        if step.chosen is not None and step.chosen.is_cuda:
            step.host = step.chosen.to("cpu", non_blocking=True)
            step.ready = torch.cuda.Event()
            step.ready.record()
        return step

    def _collect(self, step: _Step) -> list[tuple[Sequence, list[int]]]:
        if step.chosen is None:
            tokens = sample(step.logits, step.to_sample)
        elif step.ready is not None:
            step.ready.synchronize()
            tokens = step.host.tolist()
        else:
            tokens = step.chosen.tolist()
        if self.runner.step_trace:
            self.runner.step_trace.done()
        self.last_step_tokens = sum(n for _, n in step.batch)
        now = time.perf_counter()
        for seq in step.to_sample:
            if seq.first_token_time is None:
                seq.first_token_time = now
        advanced = self.scheduler.update(step.batch, {s.seq_id: t for s, t in zip(step.to_sample, tokens)})
        return [(seq, [seq.output_ids[-1]]) for seq in advanced]

    def drain(self) -> None:
        """Wait for a step still in flight whose sequences have all ended (its results are dropped)."""
        if self._inflight is not None:
            step, self._inflight = self._inflight, None
            self._collect(step)

    def _guarded(self, launch: Any, *args: Any) -> Any:
        try:
            return launch(*args)
        except RuntimeError as e:
            if self.group is None:
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise KilnError(f"the tensor-parallel group broke during a step ({first}): another rank ended "
                            "or stopped answering; see its messages") from None

    def _event(
        self, seq: Sequence, new_ids: list[int], out: RequestOutput, text: TextStream | None
    ) -> StreamEvent:
        delta = ""
        if text is not None:
            visible = seq.output_ids
            if seq.finish_reason == "stop" and seq.params.end_id is not None and visible[-1:] == [seq.params.end_id]:
                visible = visible[:-1]
            delta = text.update(visible, final=seq.finished)
            if text.stop_hit:  # the stop string's text was cut and everything before it emitted
                self.scheduler.finish(seq, "stop")
            out.text = text.text
        out.output_ids += new_ids  # (every token of the sequence arrives in exactly one event)
        out.finish_reason = seq.finish_reason
        now = time.perf_counter()
        out.ttft_s = (seq.first_token_time or now) - seq.arrival
        out.latency_s = now - seq.arrival
        return StreamEvent(out.index, delta, new_ids, seq.finished, out)

