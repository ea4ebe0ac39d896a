"""Overlapped steps give exactly the tokens of plain ones.

With overlap (the default), a step whose sampled sequences all take the argmax is followed by the next
one before its tokens reach the host: the device feeds its own argmax back as the next input, waiting
sequences are admitted and prompts prefilled in chunks as usual, and a sequence that ends meanwhile has
its extra row dropped. Every way a sequence can end or be held back
(length, end id, stop sequence, a cancel between steps, preemption, admission waves, sampling and log
probabilities in the batch) must leave outputs unchanged, and no KV block behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from model_parity import HFModel, token_ids

from kiln.config import SamplingParams
from kiln.runtime.engine import LLM

PROMPTS = [token_ids(40 + i, n) for i, n in enumerate([3, 9, 1, 14, 6, 2, 11])]


@dataclass
class Run:
    outputs: list[list[int]]
    reasons: list[str | None]
    logprobs: list[list[float]]
    ahead_steps: int


@pytest.fixture(scope="module")
def model(hf_model) -> HFModel:
    return hf_model("llama3")


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """How many steps were launched ahead, through any runner."""
    from kiln.runtime.model_runner import ModelRunner

    calls = [0]
    original = ModelRunner.run_ahead

    def run_ahead(self, *args):  # noqa: ANN001, ANN202
        calls[0] += 1
        return original(self, *args)

    monkeypatch.setattr(ModelRunner, "run_ahead", run_ahead)
    yield calls


def drive(llm: LLM, params: list[SamplingParams], counted: list[int], overlap: bool,
          cancel_after: dict[int, int] | None = None) -> Run:
    """Step the engine by hand; cancel prompt i once it has cancel_after[i] tokens (between steps)."""
    llm.overlap = overlap
    counted[0] = 0
    seqs = [llm.make_sequence(p, sp) for p, sp in zip(PROMPTS, params, strict=True)]
    for seq in seqs:
        llm.scheduler.add(seq)
    got: dict[int, list[int]] = {seq.seq_id: [] for seq in seqs}
    steps = 0
    while llm.scheduler.has_work():
        steps += 1
        assert steps < 500, "no progress"
        for seq, new_ids in llm.step():
            got[seq.seq_id] += new_ids
        for i, n in (cancel_after or {}).items():
            if len(got[seqs[i].seq_id]) >= n and not seqs[i].finished:
                llm.scheduler.finish(seqs[i], "cancelled")
    llm.drain()
    assert llm.blocks.num_used == 0, "a KV block was left taken"
    for seq in seqs:
        assert got[seq.seq_id] == seq.output_ids, "a token was reported that the sequence does not hold"
    return Run([s.output_ids for s in seqs], [s.finish_reason for s in seqs], [s.logprobs for s in seqs],
               counted[0])


def both(llm: LLM, params: list[SamplingParams], counted: list[int], **kw) -> tuple[Run, Run]:  # noqa: ANN003
    plain = drive(llm, params, counted, overlap=False, **kw)
    ahead = drive(llm, params, counted, overlap=True, **kw)
    assert plain.ahead_steps == 0
    assert ahead.outputs == plain.outputs
    assert ahead.reasons == plain.reasons
    # (batches of other sizes round float32 sums differently: equal to ~1e-7)
    assert [pytest.approx(lp, rel=1e-5, abs=1e-6) for lp in plain.logprobs] == ahead.logprobs
    return plain, ahead


def greedy(max_tokens: int, **kw) -> SamplingParams:  # noqa: ANN003
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def test_lengths_end_ids_and_stop_sequences(model: HFModel, counted: list[int]) -> None:
    llm = model.llm(max_batch_size=8, tokens_per_block=4)
    free = drive(llm, [greedy(20)] * len(PROMPTS), counted, overlap=False).outputs
    # end ids and stop sequences the greedy outputs really reach, at different steps
    params = [
        greedy(20),
        greedy(7),
        SamplingParams(max_tokens=20, temperature=0, end_id=free[2][4]),
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=(tuple(free[3][8:10]),)),
        greedy(1),
        SamplingParams(max_tokens=20, temperature=0, end_id=free[5][0]),
        greedy(13),
    ]
    plain, ahead = both(llm, params, counted)
    assert ahead.ahead_steps > 5, "the overlapped path was not taken"
    assert plain.reasons[2] == "stop" and len(plain.outputs[2]) <= 5
    assert plain.reasons[3] == "stop" and plain.reasons[5] == "stop"
    assert [len(o) for o in plain.outputs][:2] == [20, 7]


def test_admission_waves_and_cancels(model: HFModel, counted: list[int]) -> None:
    """More prompts than max_batch_size: sequences are admitted into steps launched ahead, and
    sequences cancelled between steps end where they were cancelled."""
    llm = model.llm(max_batch_size=3, tokens_per_block=4)
    params = [greedy(n) for n in (12, 5, 9, 16, 3, 8, 10)]
    plain, ahead = both(llm, params, counted, cancel_after={0: 4, 3: 7})
    assert ahead.ahead_steps > 5
    assert len(plain.outputs[0]) == 4 and len(plain.outputs[3]) == 7
    assert plain.reasons[0] == plain.reasons[3] == "cancelled"


def test_preemption_when_blocks_run_out(model: HFModel, counted: list[int]) -> None:
    llm = LLM(model.engine_dir(max_batch_size=8, tokens_per_block=4), device="cpu", num_kv_blocks=14)
    params = [greedy(18)] * len(PROMPTS)
    plain, ahead = both(llm, params, counted)
    assert llm.scheduler.num_preemptions > 0, "the cache was large enough: nothing was preempted"
    assert ahead.ahead_steps > 0


def test_sampling_and_logprobs_in_the_batch(model: HFModel, counted: list[int]) -> None:
    """A batch with a sampled or a log-probability request runs the plain way, and equally."""
    llm = model.llm(max_batch_size=8, tokens_per_block=4)
    params = [greedy(16)] * len(PROMPTS)
    params[1] = SamplingParams(max_tokens=6, temperature=0.8, seed=7, ignore_eos=True)
    params[4] = SamplingParams(max_tokens=9, temperature=0, logprobs=2, ignore_eos=True)
    plain, ahead = both(llm, params, counted)
    assert ahead.ahead_steps > 0  # once the sampled and logprob requests are done
    assert len(plain.logprobs[4]) == 9


def test_no_step_is_launched_past_the_last_token(model: HFModel, counted: list[int]) -> None:
    """Sequences that end by length at step n are not computed again in step n + 1."""
    llm = model.llm(max_batch_size=8, tokens_per_block=4)
    steps = [0]
    original = llm.runner.run, llm.runner.run_ahead

    def run(*args):  # noqa: ANN002, ANN202
        steps[0] += 1
        return original[0](*args)

    def run_ahead(*args):  # noqa: ANN002, ANN202
        steps[0] += 1
        return original[1](*args)

    llm.runner.run, llm.runner.run_ahead = run, run_ahead
    drive(llm, [greedy(9)] * len(PROMPTS), counted, overlap=True)
    assert steps[0] == 9  # one prefill step, then one per further token, and no wasted one


def test_seeded_draws_overlap_and_equal_the_plain_order(model: HFModel, counted: list[int]) -> None:
    """Drawn tokens are chosen on the device too: seeded requests overlap, and draw what they draw in
    the plain order (each from its own generator, one draw per token)."""
    llm = model.llm(max_batch_size=8, tokens_per_block=4)
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=20, seed=100 + i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    plain, ahead = both(llm, params, counted)
    assert ahead.ahead_steps > 5
    assert len({tuple(o) for o in plain.outputs}) > 1 and all(len(o) == 12 for o in plain.outputs)
