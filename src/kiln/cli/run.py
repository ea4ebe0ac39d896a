"""kiln run: generate from an engine on the command line (TensorRT-LLM's examples/run.py flags)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

from kiln.cli.options import non_negative_float, positive_int, seed_int
from kiln.errors import KilnError
from kiln.fsutil import write_atomic


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="generate text from an engine",
        description="Generate from one or more prompts; more prompts than the engine's max_batch_size "
        "run in flight, a new one starting as soon as another finishes.",
    )
    p.add_argument("--engine_dir", required=True, help="engine folder from `kiln build`")
    p.add_argument("--tokenizer_dir", required=True, help="folder with the tokenizer (the Hugging Face model)")
    p.add_argument("--input_text", nargs="+", action="extend", default=[], help="prompt(s); repeatable")
    p.add_argument(
        "--input_file",
        help="prompts from a file: .txt (one per line), .json (a list of strings), .csv (token ids, one row each)",
    )
    p.add_argument("--max_output_len", type=positive_int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--use_chat_template", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    s = p.add_argument_group("sampling")
    s.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 is greedy (default 0)")
    s.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens; 0 is off")
    s.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1 is off")
    s.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeating any seen token")
    s.add_argument("--presence_penalty", type=float, default=0.0, help="subtracted once from every generated token")
    s.add_argument("--frequency_penalty", type=float, default=0.0, help="subtracted per occurrence of a generated token")
    s.add_argument("--random_seed", type=seed_int, default=None, help="seed for sampling (reproducible output)")
    s.add_argument("--end_id", type=int, default=None, help="token id that ends generation (default: the tokenizer's eos)")
    s.add_argument("--stop_words", nargs="+", action="extend", default=[], help="strings that end generation")
    p.add_argument("--streaming", action="store_true", help="print text as it is generated")
    p.add_argument("--output_csv", help="write output token ids, one row per input")
    p.add_argument("--output_json", help="write inputs, outputs, token ids and timings")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when a GPU is visible, else cpu)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from kiln.config import SamplingParams
    from kiln.runtime.engine import LLM

    prompts = list(args.input_text) + (read_input_file(Path(args.input_file)) if args.input_file else [])
    if not prompts:
        raise KilnError("no prompt: give --input_text TEXT or --input_file FILE")
    params = SamplingParams(
        max_tokens=args.max_output_len,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.random_seed,
        end_id=args.end_id,
        stop=tuple(args.stop_words),
    )
    llm = LLM(args.engine_dir, args.tokenizer_dir, device=args.device)
    shown = list(prompts)  # what the user gave, printed and written as "input" (not the templated ids)
    if args.use_chat_template:
        prompts = [chat_prompt(llm.tokenizer, p) if isinstance(p, str) else p for p in prompts]
    start = time.perf_counter()
    outputs = generate_and_print(llm, prompts, params, args.streaming, shown)
    elapsed = time.perf_counter() - start
    print_speed(outputs, elapsed)
    if not args.use_chat_template:
        hint_chat_template(outputs, llm.tokenizer)
    if args.output_csv:
        write_atomic(Path(args.output_csv), "".join(",".join(map(str, o.output_ids)) + "\n" for o in outputs))
    if args.output_json:
        write_atomic(Path(args.output_json), json.dumps(json_report(outputs, elapsed, shown), indent=2) + "\n")
    return 0


def read_input_file(path: Path) -> list[Any]:
    if not path.is_file():
        raise KilnError(f"--input_file {path}: no such file")
    text = path.read_text()
    if path.suffix == ".csv":
        try:
            return [[int(t) for t in row if t.strip()] for row in csv.reader(text.splitlines()) if row]
        except ValueError as e:
            raise KilnError(f"--input_file {path}: a .csv holds token ids ({e})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise KilnError(f"--input_file {path}: not valid JSON ({e})") from None
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise KilnError(f"--input_file {path}: a .json file must hold a list of strings")
        return data
    return [line for line in text.splitlines() if line.strip()]


def chat_prompt(tokenizer: Any, text: str) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise KilnError("--use_chat_template: this tokenizer has no chat template")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def generate_and_print(
    llm: Any, prompts: list[Any], params: Any, streaming: bool, shown: list[Any]
) -> list[Any]:
    """Print each input (as the user gave it: `shown`) and its output as TensorRT-LLM's run.py does;
    stream one input at a time."""
    if not streaming:
        outputs = llm.generate(prompts, params)
        for o in outputs:
            print(f'Input [Text {o.index}]: "{shown[o.index]}"\nOutput [Text {o.index} Beam 0]: "{o.text}"')
        return outputs
    n = len(prompts)
    outputs: list[Any] = [None] * n
    texts = [""] * n
    live = 0  # the input whose text streams to the terminal; later ones are shown when it ends

    def show(i: int) -> None:
        print(f'Input [Text {i}]: "{shown[i]}"\nOutput [Text {i} Beam 0]: {texts[i]}', end="", flush=True)

    show(live)
    for ev in llm.stream(prompts, params):
        texts[ev.index] += ev.delta
        if ev.index == live:
            print(ev.delta, end="", flush=True)
        if ev.finished:
            outputs[ev.index] = ev.output
        while live < n and outputs[live] is not None:
            print()
            live += 1
            if live < n:
                show(live)
    return outputs


def hint_chat_template(outputs: list[Any], tokenizer: Any) -> None:
    """An instruct model given a bare prompt often answers with its end token at once: an empty output
    that looks like a fault. Say why, where the tokenizer has a chat template the user did not ask for."""
    empty = [o.index for o in outputs if not o.text and len(o.output_ids) <= 1 and o.finish_reason == "stop"]
    if empty and getattr(tokenizer, "chat_template", None):
        which = ", ".join(map(str, empty))
        print(f"[kiln] the model ended input {which} at once, with its end token: this tokenizer has a chat "
              "template, and a chat (instruct) model usually needs --use_chat_template", file=sys.stderr)


def print_speed(outputs: list[Any], elapsed: float) -> None:
    tokens = sum(len(o.output_ids) for o in outputs)
    ttft = sum(o.ttft_s for o in outputs) / len(outputs)
    print(
        f"[kiln] {len(outputs)} request(s), {tokens} output tokens in {elapsed:.2f} s: "
        f"{tokens / elapsed:.1f} tokens/s, mean time to first token {ttft * 1000:.0f} ms",
        file=sys.stderr,
    )


def json_report(outputs: list[Any], elapsed: float, shown: list[Any]) -> dict[str, Any]:
    tokens = sum(len(o.output_ids) for o in outputs)
    return {
        "outputs": [
            {
                "input": shown[o.index],
                "input_token_ids": o.prompt_ids,
                "output_text": o.text,
                "output_token_ids": o.output_ids,
                "finish_reason": o.finish_reason,
                "time_to_first_token_ms": round(o.ttft_s * 1000, 3),
                "latency_ms": round(o.latency_s * 1000, 3),
            }
            for o in outputs
        ],
        "total_time_s": round(elapsed, 4),
        "output_tokens": tokens,
        "tokens_per_s": round(tokens / elapsed, 2),
    }


