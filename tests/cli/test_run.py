"""`kiln run` with each of its flags, on the real SmolLM2-135M-Instruct engine built with a seed's flags.

All the runs start together (a few at a time, in the background) when the first test needs one; each
test then checks its runs. Greedy runs use the same three prompts, one more than the engine's
max_batch_size, so that their outputs can be compared token for token.
"""

from __future__ import annotations

import csv
import json
import subprocess
from concurrent.futures import Future
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest

from .conftest import MAX_BATCH_SIZE, Background, check_ok, kiln

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Hello, my name is", "1, 1, 1, 1, 1, 1, 1, 1,"]
REPEATING = PROMPTS[2]  # greedy continues it with " 1, 1, ...": the penalties must change that
MAX_OUTPUT_LEN = 6
SAMPLING = ["--temperature", "1.0", "--top_k", "50", "--top_p", "0.95"]
STOP_WORDS = [".", ","]
CHAT_QUESTION = "What is the capital of France?"


@dataclass
class Run:
    proc: subprocess.CompletedProcess[str]
    json_path: Path
    csv_path: Path

    @cached_property
    def report(self) -> dict[str, Any]:
        check_ok(self.proc)
        return json.loads(self.json_path.read_text())

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return self.report["outputs"]

    @property
    def ids(self) -> list[list[int]]:
        return [o["output_token_ids"] for o in self.outputs]

    @property
    def texts(self) -> list[str]:
        return [o["output_text"] for o in self.outputs]

    @property
    def csv_rows(self) -> list[list[int]]:
        check_ok(self.proc)
        with self.csv_path.open(newline="") as f:
            return [[int(t) for t in row] for row in csv.reader(f)]


@pytest.fixture(scope="module")
def runs(
    engine: Path, smollm2_hf: Path, tokenizer: Any, background: Background, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Future[Run]]:
    tmp = tmp_path_factory.mktemp("run")
    txt, json_file, csv_file = tmp / "prompts.txt", tmp / "prompts.json", tmp / "prompts.csv"
    txt.write_text("\n".join(PROMPTS) + "\n")
    json_file.write_text(json.dumps(PROMPTS))
    csv_file.write_text("".join(",".join(map(str, tokenizer.encode(p).ids)) + "\n" for p in PROMPTS))

    def run(name: str, *args: Any) -> Run:
        json_path, csv_path = tmp / f"{name}.json", tmp / f"{name}.csv"
        proc = kiln("run", "--engine_dir", engine, "--tokenizer_dir", smollm2_hf, "--max_output_len", MAX_OUTPUT_LEN,
                    *args, "--output_json", json_path, "--output_csv", csv_path)
        return Run(proc, json_path, csv_path)

    def start(name: str, *args: Any) -> Future[Run]:
        return background.call(run, name, *args)

    # --input_text takes several prompts, and is repeatable
    three_prompts = ["--input_text", PROMPTS[0], PROMPTS[1], "--input_text", PROMPTS[2]]
    jobs = {
        "greedy": start("greedy", *three_prompts, "--temperature", "0"),
        "streaming": start("streaming", *three_prompts, "--streaming"),
        "txt": start("txt", "--input_file", txt),
        "json": start("json", "--input_file", json_file),
        "csv": start("csv", "--input_file", csv_file),
        "seed_1234": start("seed_1234", *three_prompts, *SAMPLING, "--random_seed", "1234"),
        "seed_1234_again": start("seed_1234_again", *three_prompts, *SAMPLING, "--random_seed", "1234"),
        "seed_4321": start("seed_4321", *three_prompts, *SAMPLING, "--random_seed", "4321"),
        "top_k_1": start("top_k_1", *three_prompts, "--temperature", "1.0", "--top_k", "1", "--random_seed", "7"),
        "top_p_tiny": start("top_p_tiny", *three_prompts, "--temperature", "1.0", "--top_p", "0.001",
                            "--random_seed", "7"),
        "repetition_penalty": start("repetition_penalty", "--input_text", REPEATING, "--repetition_penalty", "100"),
        "presence_penalty": start("presence_penalty", "--input_text", REPEATING, "--presence_penalty", "100"),
        "frequency_penalty": start("frequency_penalty", "--input_text", REPEATING, "--frequency_penalty", "100"),
        "stop_words": start("stop_words", *three_prompts, "--stop_words", STOP_WORDS[0], "--stop_words",
                            *STOP_WORDS[1:]),
        "chat": start("chat", "--input_text", CHAT_QUESTION, "--use_chat_template", "--max_output_len", "8"),
        "chat_bare": start("chat_bare", "--input_text", CHAT_QUESTION, "--max_output_len", "8"),
    }

    def end_id_run() -> Run:
        # The second token greedy emits for the first prompt ends every output at its first occurrence.
        end_id = jobs["greedy"].result().ids[0][1]
        return run("end_id", *three_prompts, "--end_id", end_id)

    jobs["end_id"] = background.call(end_id_run)
    return jobs


def get(runs: dict[str, Future[Run]], name: str) -> Run:
    run = runs[name].result()
    check_ok(run.proc)
    return run


def test_more_prompts_than_max_batch_size_all_complete(runs: dict[str, Future[Run]]) -> None:
    greedy = get(runs, "greedy")
    assert len(PROMPTS) > MAX_BATCH_SIZE
    assert [o["input"] for o in greedy.outputs] == PROMPTS
    assert [len(ids) for ids in greedy.ids] == [MAX_OUTPUT_LEN] * len(PROMPTS)
    assert [o["finish_reason"] for o in greedy.outputs] == ["length"] * len(PROMPTS)
    assert greedy.texts[0].startswith(" Paris")  # the real model, converted and built right


def test_prints_each_input_and_output(runs: dict[str, Future[Run]]) -> None:
    greedy = get(runs, "greedy")
    for i, (prompt, text) in enumerate(zip(PROMPTS, greedy.texts)):
        assert f'Input [Text {i}]: "{prompt}"\nOutput [Text {i} Beam 0]: "{text}"\n' in greedy.proc.stdout
    tokens = len(PROMPTS) * MAX_OUTPUT_LEN
    assert f"[kiln] {len(PROMPTS)} request(s), {tokens} output tokens in " in greedy.proc.stderr
    assert "tokens/s" in greedy.proc.stderr


def test_output_json_holds_inputs_outputs_token_ids_and_timings(runs: dict[str, Future[Run]], tokenizer: Any) -> None:
    report = get(runs, "greedy").report
    assert len(report["outputs"]) == len(PROMPTS)
    for prompt, out in zip(PROMPTS, report["outputs"]):
        assert out["input"] == prompt
        assert out["input_token_ids"] == tokenizer.encode(prompt).ids
        assert tokenizer.decode(out["output_token_ids"]) == out["output_text"]
        assert 0 < out["time_to_first_token_ms"] <= out["latency_ms"]
    assert report["output_tokens"] == sum(len(o["output_token_ids"]) for o in report["outputs"])
    assert report["total_time_s"] > 0 and report["tokens_per_s"] > 0


def test_output_csv_has_one_row_of_output_ids_per_input(runs: dict[str, Future[Run]]) -> None:
    for name in runs:
        run = get(runs, name)
        assert run.csv_rows == run.ids, name


def test_greedy_twice_gives_identical_output(runs: dict[str, Future[Run]]) -> None:
    """--temperature 0, and the default temperature (the run reading a .json file), are greedy."""
    greedy, again = get(runs, "greedy"), get(runs, "json")
    assert "--temperature" not in again.proc.args
    assert again.ids == greedy.ids
    assert again.texts == greedy.texts


def test_streaming_prints_the_same_text(runs: dict[str, Future[Run]]) -> None:
    greedy, streaming = get(runs, "greedy"), get(runs, "streaming")
    assert streaming.ids == greedy.ids
    for i, (prompt, text) in enumerate(zip(PROMPTS, greedy.texts)):
        assert f'Input [Text {i}]: "{prompt}"\nOutput [Text {i} Beam 0]: {text}\n' in streaming.proc.stdout
    assert streaming.proc.stdout.count("Input [Text ") == len(PROMPTS)


@pytest.mark.parametrize("kind", ["txt", "json", "csv"])
def test_input_file(runs: dict[str, Future[Run]], kind: str) -> None:
    greedy, from_file = get(runs, "greedy"), get(runs, kind)
    assert [o["input_token_ids"] for o in from_file.outputs] == [o["input_token_ids"] for o in greedy.outputs]
    assert from_file.ids == greedy.ids
    if kind == "csv":  # token-id prompts are shown as the ids
        assert [o["input"] for o in from_file.outputs] == [o["input_token_ids"] for o in greedy.outputs]
    else:
        assert [o["input"] for o in from_file.outputs] == PROMPTS


def test_same_random_seed_gives_the_same_sample(runs: dict[str, Future[Run]]) -> None:
    first, again, other = get(runs, "seed_1234"), get(runs, "seed_1234_again"), get(runs, "seed_4321")
    greedy = get(runs, "greedy")
    assert again.ids == first.ids
    assert again.texts == first.texts
    assert other.ids != first.ids  # the seed matters
    assert first.ids != greedy.ids  # and temperature 1 samples


@pytest.mark.parametrize("name", ["top_k_1", "top_p_tiny"])
def test_top_k_1_and_tiny_top_p_sample_the_greedy_token(runs: dict[str, Future[Run]], name: str) -> None:
    assert get(runs, name).ids == get(runs, "greedy").ids


def test_repetition_penalty(runs: dict[str, Future[Run]]) -> None:
    greedy = get(runs, "greedy").ids[2]
    assert len(set(greedy)) < len(greedy)  # without penalties, the prompt's tokens come again
    (out,) = get(runs, "repetition_penalty").outputs
    ids = out["output_token_ids"]
    assert len(ids) == MAX_OUTPUT_LEN
    assert not set(ids) & set(out["input_token_ids"]), "a penalty of 100 should keep the prompt's tokens out"
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
def test_presence_and_frequency_penalty(runs: dict[str, Future[Run]], name: str) -> None:
    greedy = get(runs, "greedy").ids[2]
    assert len(set(greedy)) < len(greedy)
    (ids,) = get(runs, name).ids
    assert len(ids) == MAX_OUTPUT_LEN
    assert len(set(ids)) == len(ids), f"{ids}: a penalty of 100 should keep any token from coming twice"
    assert ids[0] == greedy[0]  # nothing generated yet: nothing to penalize


def test_end_id_stops_generation(runs: dict[str, Future[Run]]) -> None:
    greedy, run = get(runs, "greedy"), get(runs, "end_id")
    end_id = greedy.ids[0][1]
    assert f"--end_id {end_id}" in " ".join(map(str, run.proc.args))
    for g_ids, g_text, out in zip(greedy.ids, greedy.texts, run.outputs):
        if end_id in g_ids:
            assert out["output_token_ids"] == g_ids[: g_ids.index(end_id) + 1]
            assert out["finish_reason"] == "stop"
            assert g_text.startswith(out["output_text"]) and len(out["output_text"]) < len(g_text)
        else:
            assert out["output_token_ids"] == g_ids
            assert out["finish_reason"] == "length"
    assert len(run.ids[0]) == 2


def test_stop_words_end_the_text_before_them(runs: dict[str, Future[Run]]) -> None:
    greedy, run = get(runs, "greedy"), get(runs, "stop_words")
    cut = 0
    for i, (g_text, out) in enumerate(zip(greedy.texts, run.outputs)):
        found = [g_text.find(s) for s in STOP_WORDS if s in g_text]
        if found:
            cut += 1
            assert out["output_text"] == g_text[: min(found)]
            assert out["finish_reason"] == "stop"
        else:
            assert out["output_text"] == g_text
        assert not any(s in out["output_text"] for s in STOP_WORDS)
        assert f'Output [Text {i} Beam 0]: "{out["output_text"]}"\n' in run.proc.stdout
    assert cut >= 2, f"the greedy texts {greedy.texts} should hold both stop words"


def test_use_chat_template(runs: dict[str, Future[Run]], tokenizer: Any) -> None:
    run = get(runs, "chat")
    (out,) = run.outputs
    prompt = tokenizer.decode(out["input_token_ids"], skip_special_tokens=False)
    assert f"<|im_start|>user\n{CHAT_QUESTION}<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "Paris" in out["output_text"]
    # the user's question is what is shown, not the templated token ids
    assert out["input"] == CHAT_QUESTION
    assert f'Input [Text 0]: "{CHAT_QUESTION}"' in run.proc.stdout



def test_an_empty_answer_to_a_bare_prompt_points_to_the_chat_template(runs: dict[str, Future[Run]]) -> None:
    bare = get(runs, "chat_bare")
    (out,) = bare.outputs  # SmolLM2-Instruct answers a bare question with its end token
    assert out["output_text"] == "" and out["finish_reason"] == "stop"
    assert "--use_chat_template" in bare.proc.stderr
    assert "--use_chat_template" not in get(runs, "chat").proc.stderr
    assert "--use_chat_template" not in get(runs, "greedy").proc.stderr  # outputs that say something
