"""`kiln quickstart` with no arguments, twice, in the shared KILN_HOME: the second run finds every step cached."""

from __future__ import annotations

import re
import subprocess

import pytest

from .conftest import KILN_HOME, Artifacts, check_ok

pytestmark = pytest.mark.slow

STEPS = ("Hugging Face folder from", "checkpoint (", "engine for ")
TIME = r"\(\d+\.\d s\)"


@pytest.fixture(scope="module")
def quickstarts(artifacts: Artifacts) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """Both runs, started with the session's other background work (after the HF folder is in KILN_HOME)."""
    first, second = artifacts.quickstart.result()
    return check_ok(first), check_ok(second)


def step_lines(stdout: str, n: int) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(f"[{n}/4] ")]


def check_generation(stdout: str) -> None:
    assert re.search(r"^\[4/4\] load engine: \d+\.\d s$", stdout, re.M), stdout
    speed = re.search(r"^\[4/4\] generate: (\d+) prompt tokens, (\d+) output tokens in \d+\.\d+ s: "
                      r"(\d+\.\d) tokens/s; time to first token \d+ ms", stdout, re.M)
    assert speed, stdout
    assert int(speed[1]) > 0 and int(speed[2]) > 0 and float(speed[3]) > 0
    answer = re.search(r"^SmolLM2: (.*)$", stdout, re.M)
    assert answer and "Paris" in answer[1], stdout
    assert "\nNext: kiln run --engine_dir " in stdout


def test_quickstart_prints_each_step_with_its_time(quickstarts: tuple[subprocess.CompletedProcess[str], ...]) -> None:
    first, _ = quickstarts
    header = first.stdout.splitlines()[0]
    assert re.fullmatch(rf"kiln quickstart: SmolLM2-135M-Instruct on (cpu|cuda), cache in {re.escape(str(KILN_HOME))}",
                        header), header
    for n, what in enumerate(STEPS, start=1):
        lines = step_lines(first.stdout, n)
        assert lines and what in lines[0], first.stdout
        # done now (a "writing" line, then "done (time)"), or found in the cache (with the time it took to look)
        assert re.fullmatch(rf"\[{n}/4\] .*: (cached at \S+ {TIME}|done {TIME})", lines[-1]), lines
    check_generation(first.stdout)
    engines = KILN_HOME / "engines"
    assert any((folder / "engine.json").is_file() for folder in engines.iterdir())


def test_second_quickstart_finds_every_step_cached(quickstarts: tuple[subprocess.CompletedProcess[str], ...]) -> None:
    first, second = quickstarts
    for n in range(1, 4):
        (line,) = step_lines(second.stdout, n)
        assert re.fullmatch(rf"\[{n}/4\] .*: cached at {re.escape(str(KILN_HOME))}/\S+ {TIME}", line), line
    check_generation(second.stdout)
    answer = re.compile(r"^SmolLM2: .*$", re.M)
    assert answer.findall(second.stdout) == answer.findall(first.stdout)  # greedy: the same answer


def test_a_step_started_twice_at_once_is_made_once(tmp_path, capsys) -> None:
    """Two quickstarts at once: the second waits for the first's step and finds it cached."""
    import threading
    import time

    from kiln.cli.quickstart import _step

    folder = tmp_path / "engines" / "e"
    made: list[str] = []

    def make(who: str) -> None:
        made.append(who)
        time.sleep(0.3)
        folder.mkdir(parents=True)
        (folder / "engine.json").write_text("{}")

    first = threading.Thread(target=_step, args=(3, "engine", folder, "engine.json", False, lambda: make("first")))
    first.start()
    while not made:
        time.sleep(0.01)
    _step(3, "engine", folder, "engine.json", False, lambda: make("second"))
    first.join()
    assert made == ["first"]
    assert "cached at" in capsys.readouterr().out
