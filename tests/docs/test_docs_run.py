"""Every command line of the user docs, run as written, on a tiny model: the docs cannot rot.

The pages (`pages()`, run in this order in one working folder: later pages use the folders that earlier
ones make): docs/getting-started.md, docs/multi-gpu.md, README.md, docs/quantization.md, docs/gpu.md,
docs/serving.md, docs/docker.md, docs/commands/*.md in `kiln --help` order, and docs/trtllm-mapping.md.
Running one page's test runs the pages before it first. docs/architecture.md and docs/formats.md show
no commands.

No command line hides outside a ```bash block (`test_no_command_line_outside_bash_blocks`, over
README.md and every docs/**/*.md): a line whose program (after a `$ ` prompt, `sudo` or `VAR=value`
words) is one of COMMAND_PROGRAMS fails the test when it is in an indented code block (4 spaces or
more, list items' included) or in any fenced block but ```bash. ```text blocks are for output; the one
exception is the synopsis under `## Usage` in docs/commands/, generated from the parser (placeholders,
not a command). A page with a ```bash block must be one of `pages()`.

What is run:
- every line of a ```bash block, a trailing `\\` joining it to the next; `# ...` is a comment;
- except a block whose first line is `# not run: REASON`, or a line that ends in `# not run: REASON`
  (Docker, installing packages, a GPU's work); the reason is required;
- shell commands belong in ```bash blocks: a ```sh / ```shell / ```console block fails the test;
- a ```json block right after a ```bash block that ends in `curl` shows the answer: the real answer
  must hold every key it shows (values differ: the model here is random);
- the programs are `kiln`, `mpirun ... kiln`, `torchrun ... $(which kiln)` and `curl`; any other line
  fails the test unless marked. `kiln serve` starts in the background and serves the page's later lines
  (the curl lines, `kiln bench serve`) until the next `kiln serve` or the page's end, then gets SIGTERM
  and must exit 0.

Each kiln command must exit 0 and print what EXPECT says; the folders it says it writes must exist.

The substitutions, the only differences from what the pages say (keep this list short: the point is
that the pages' flags are real flags of real commands):
- the model: the Hub repos in REPOS are served by a local stand-in of the Hub (HF_ENDPOINT), all with
  one tiny random Llama (4 heads, 1 KV head, vocabulary 49152, SmolLM2's real tokenizer), so that
  every step of the workflow, tensor parallelism over 2 ranks included, runs in seconds;
- `--device cpu` on every kiln command that has `--device`, so that the ranks of a 2-rank engine run
  as processes on one machine, as they do in CI;
- SHRINK: the calibration and `--eval` text of `kiln quantize`, `kiln run`'s `--max_output_len` and the load of
  `kiln bench serve` made small;
- port 8000 (`kiln serve`'s default, and in URLs) becomes a free port;
- `$(which kiln)` becomes the path of this environment's kiln script.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from . import REPO, command_docs

REPOS = ("mistralai/Mistral-7B-v0.3", "mistralai/Mistral-Nemo-Instruct-2407")
SHRINK = {  # command -> {flag: the value used here, where the page gives a larger one or none}
    "quantize": {"--calib_size": "16", "--calib_max_seq_length": "64", "--eval_tokens": "4096"},
    "run": {"--max_output_len": "32"},
    "bench serve": {"--num_requests": "16", "--output_len": "16"},
}
DOC_PORT = "8000"
EXPECT = {  # what each command prints when it has done its work
    "download": "downloaded to ",
    "convert": "checkpoint written to ",
    "quantize": "checkpoint written to ",
    "build": "engine written to ",
    "run": "Output [Text 0 Beam 0]: ",
    "serve": "[kiln] serving ",
    "eval": "perplexity ",
    "bench latency": "kiln bench latency: ",
    "bench throughput": "kiln bench throughput: ",
    "bench serve": "kiln bench serve: ",
    "quickstart": "[4/4] generate: ",
    "doctor": "Result: ",
}
WRITES = {"download": "config.json", "convert": "config.json", "quantize": "config.json", "build": "engine.json"}
SHELL_FENCES = ("sh", "shell", "console", "zsh")
COMMAND_PROGRAMS = ("kiln", "mpirun", "torchrun", "curl", "docker", "python", "python3")
NOT_RUN = re.compile(r"(?:^|\s)#\s*not run:(.*)$")
TIMEOUT_S = 300


# ---- reading the pages --------------------------------------------------------------------------

@dataclass
class Step:
    """One command line of a page."""

    page: str
    line: int
    text: str  # as on the page, continuation lines joined
    skip: str | None = None  # the reason given with `# not run:`
    answer: dict | None = None  # the ```json block after it (curl)

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def pages() -> list[Path]:
    docs = REPO / "docs"
    cmds = [docs / "commands" / c.filename for c in command_docs().commands()]
    guides = [docs / f"{name}.md" for name in ("quantization", "gpu", "serving", "docker")]
    return [docs / "getting-started.md", docs / "multi-gpu.md", REPO / "README.md", *guides, *cmds,
            docs / "trtllm-mapping.md"]


def doc_files() -> list[Path]:
    """Every page of the user docs, whether or not it shows commands."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def page_id(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def fenced_blocks(text: str) -> Iterator[tuple[str, int, list[str], str]]:
    """(language, line number of the first line, lines, the text up to the next block) per fenced block."""
    lines, i = text.splitlines(), 0
    blocks = []
    while i < len(lines):
        opening = re.match(r"^\s*```(\S*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"line {i + 1}: a ``` block that never closes"
        blocks.append((opening[1].lower(), i + 2, lines[i + 1:end], end + 1))
        i = end + 1
    for k, (lang, first, body, after) in enumerate(blocks):
        upto = blocks[k + 1][1] - 2 if k + 1 < len(blocks) else len(lines)
        yield lang, first, body, "\n".join(lines[after:upto])


def steps_of(path: Path) -> list[Step]:
    """The command lines of a page's ```bash blocks, with their `not run` reasons and shown answers."""
    steps: list[Step] = []
    name = page_id(path)
    last_bash: list[Step] | None = None
    for lang, first, body, between in fenced_blocks(path.read_text()):
        assert lang not in SHELL_FENCES, f"{name}:{first - 1}: shell commands go in ```bash blocks, not ```{lang}"
        if lang == "json" and last_bash:
            assert last_bash[-1].text.startswith("curl "), f"{name}:{first - 1}: a ```json block shows " \
                                                            "the answer of the curl line just before it"
            last_bash[-1].answer = json.loads("\n".join(body))
        if lang != "bash":
            last_bash = None
            continue
        block = _bash_steps(name, first, body)
        steps += block
        last_bash = block if not between.strip() else None
    return steps


def _bash_steps(name: str, first: int, body: list[str]) -> list[Step]:
    whole = NOT_RUN.match(body[0].strip()) if body else None  # the block's marker, on its first line
    assert whole is None or whole[1].strip(), f"{name}:{first}: `# not run:` needs a reason"
    out: list[Step] = []
    text, start = "", first
    for n, raw in enumerate(body, first):
        line = raw.strip()
        if not text:
            if line.startswith("#") and NOT_RUN.match(line) and n != first:
                pytest.fail(f"{name}:{n}: `# not run:` on a line of its own marks a whole block: put it on "
                            "the block's first line, or at the end of the line it is about")
            if not line or line.startswith("#"):
                continue
            start = n
        joined = line.endswith("\\")
        text = f"{text} {line[:-1] if joined else line}".strip()
        if joined:
            continue
        marker = NOT_RUN.search(text)
        assert marker is None or marker[1].strip(), f"{name}:{start}: `# not run:` needs a reason"
        reason = whole[1].strip() if whole else marker[1].strip() if marker else None
        out.append(Step(name, start, NOT_RUN.sub("", text).strip(), skip=reason))
        text = ""
    assert not text, f"{name}:{start}: the block's last line ends in `\\`"
    return out


def stray_command_lines(path: Path) -> list[str]:
    """'page:line: text' for each command line outside a ```bash block (the rule of the module docstring)."""
    name, found = page_id(path), []
    fence: str | None = None
    heading = ""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if fence is None:
            opening = re.match(r"^\s*```(\S*)\s*$", line)
            if opening:
                fence = opening[1].lower()
                continue
            if line.startswith("#"):
                heading = line.strip()
            code = re.match(r"^( {4,}|\t)", line) is not None
        elif line.strip() == "```":
            fence = None
            continue
        else:
            synopsis = fence == "text" and heading == "## Usage" and path.parent.name == "commands"
            code = fence != "bash" and not synopsis
        if code and is_command_line(line):
            found.append(f"{name}:{n}: {line.strip()}")
    return found


def is_command_line(line: str) -> bool:
    words = line.strip().removeprefix("$ ").split()
    while words and (words[0] == "sudo" or re.match(r"^[A-Za-z_]\w*=", words[0])):
        words = words[1:]
    return bool(words) and words[0] in COMMAND_PROGRAMS


def argv_of(step: Step, kiln: str) -> list[str]:
    return shlex.split(step.text.replace("$(which kiln)", kiln), comments=True)


# ---- what each line is --------------------------------------------------------------------------

def kiln_part(argv: list[str], kiln: str) -> list[str] | None:
    """The `kiln ...` words of a line (its own, or the program that mpirun or torchrun starts)."""
    if argv[0] == "kiln":
        return argv
    if argv[0] in ("mpirun", "torchrun"):
        at = next((i for i, a in enumerate(argv) if a in ("kiln", kiln)), None)
        return argv[at:] if at is not None else None
    return None


def parser_for(words: list[str]) -> tuple[str, argparse.ArgumentParser]:
    """('bench latency', its parser) for the words after `kiln`."""
    from kiln.cli import make_parser

    parser, name = make_parser(), []
    for word in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser, name = subs[0].choices[word], [*name, word]
    return " ".join(name), parser


def set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    if flag in argv:
        i = argv.index(flag)
        return [*argv[: i + 1], value, *argv[i + 2:]]
    return [*argv, flag, value]


def substitute(kiln_argv: list[str], port: int) -> list[str]:
    """The substitutions of the module docstring, on the words of one kiln command."""
    name, parser = parser_for(kiln_argv[1:])
    argv = list(kiln_argv)
    if "--device" in parser._option_string_actions:
        argv = set_flag(argv, "--device", "cpu")
    for flag, value in SHRINK.get(name, {}).items():
        if flag not in argv or int(argv[argv.index(flag) + 1]) > int(value):
            argv = set_flag(argv, flag, value)
    if name == "serve":
        argv = set_flag(argv, "--port", str(port))
    return [_port(a, port) for a in argv]


def _port(word: str, port: int) -> str:
    return re.sub(rf"(localhost|127\.0\.0\.1):{DOC_PORT}\b", f"127.0.0.1:{port}", word)


# ---- running a page -----------------------------------------------------------------------------

@dataclass
class Server:
    proc: subprocess.Popen
    log: Path
    step: Step


@dataclass
class Runner:
    """Runs pages in order in one working folder, with the Hub stand-in and a free port."""

    work: Path
    env: dict[str, str]
    kiln: str
    port: int = 0
    server: Server | None = None
    done: dict[str, BaseException | None] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def run_through(self, target: Path) -> None:
        """Run every page up to `target` that has not run yet; fail if `target` or one before it failed."""
        for path in pages():
            name = page_id(path)
            if name not in self.done:
                try:
                    self.run_page(path)
                    self.done[name] = None
                except BaseException as e:  # recorded for the pages after it, raised for its own test
                    self.done[name] = e
                    if path == target:
                        raise
            if self.done[name] is not None and path != target:
                first = (str(self.done[name]).splitlines() or [""])[0][:300]
                pytest.fail(f"{page_id(target)} needs the folders of {name}, which failed: {first}")
            if path == target:
                return

    def run_page(self, path: Path) -> None:
        try:
            for step in steps_of(path):
                if step.skip is None:
                    self.run_step(step)
        except BaseException:
            self.kill_server()
            raise
        self.stop_server()

    def run_step(self, step: Step) -> None:
        argv = argv_of(step, self.kiln)
        if argv[0] == "curl":
            return self.curl(step, argv)
        words = kiln_part(argv, self.kiln)
        assert words is not None, f"{step}: don't know how to run this line; mark it `# not run: REASON`"
        name, _ = parser_for(words[1:])
        assert name in EXPECT, f"{step}: no expectation for `kiln {name}` in EXPECT"
        launcher = self.launcher(step, argv, words)
        if launcher is None:
            return
        if name == "serve":
            self.stop_server()
            self.port = free_port()
        cmd = launcher + substitute(words, self.port)[1:]
        if name == "serve":
            return self.start_server(step, cmd)
        proc = subprocess.run(cmd, cwd=self.work, env=self.env, capture_output=True, text=True, timeout=TIMEOUT_S)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{step}\nexit status {proc.returncode}:\n{output[-4000:]}"
        assert EXPECT[name] in output, f"{step}\ndoes not print {EXPECT[name]!r}:\n{output[-4000:]}"
        self.check_files(step, name, words)

    def launcher(self, step: Step, argv: list[str], words: list[str]) -> list[str] | None:
        """The program and its arguments up to kiln's own (the kiln script's full path); None when the
        line cannot run here (mpirun not installed: the page's test is then skipped, saying so)."""
        if argv[0] == "kiln":
            return [self.kiln]
        program = shutil.which(argv[0], path=self.env["PATH"])
        if program is None:
            if argv[0] == "mpirun" and not os.environ.get("KILN_REQUIRE_MPI"):
                self.skipped.append(f"{step}: mpirun is not installed (Debian: apt-get install openmpi-bin)")
                return None
            pytest.fail(f"{step}: {argv[0]} is not installed")
        return [program, *argv[1: len(argv) - len(words)], self.kiln]

    def check_files(self, step: Step, name: str, words: list[str]) -> None:
        for flag in ("--output_dir", "--output-dir"):
            if name in WRITES and flag in words:
                folder = self.work / words[words.index(flag) + 1]
                assert (folder / WRITES[name]).is_file(), f"{step}: wrote no {folder / WRITES[name]}"
        for flag in ("--output_json", "--output_csv"):
            if flag in words:
                written = self.work / words[words.index(flag) + 1]
                assert written.is_file() and written.stat().st_size > 0, f"{step}: wrote no {written}"
                if flag == "--output_json":
                    json.loads(written.read_text())

    # ---- the server of a page ----
    def start_server(self, step: Step, cmd: list[str]) -> None:
        log = self.work / f"serve-{step.line}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, cwd=self.work, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.server = Server(proc, log, step)
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{step}\nended with status {proc.returncode}:\n{log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail(f"{step}: not ready after {TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
        assert EXPECT["serve"] in log.read_text(), f"{step}: does not print {EXPECT['serve']!r}"

    def stop_server(self) -> None:
        """SIGTERM, as `docker stop` or a service manager sends it: the server must end cleanly."""
        server = self.server
        if server is None:
            return
        server.proc.send_signal(signal.SIGTERM)
        try:
            status = server.proc.wait(timeout=60)
        finally:
            self.kill_server()
        log = server.log.read_text()
        assert status == 0, f"{server.step}\nexit status {status} after SIGTERM:\n{log[-4000:]}"
        assert "[kiln] server stopped" in log, f"{server.step}: no '[kiln] server stopped':\n{log[-4000:]}"

    def kill_server(self) -> None:
        """The server and whatever it started (the other ranks), at once."""
        server, self.server = self.server, None
        if server is None:
            return
        try:
            os.killpg(server.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.proc.wait()

    # ---- curl ----
    def curl(self, step: Step, argv: list[str]) -> None:
        assert self.server is not None, f"{step}: a curl line needs a `kiln serve` line before it on the page"
        program = shutil.which("curl")
        if program is None:
            pytest.fail("curl is not installed (Debian: apt-get install curl)")
        cmd = [program, "--max-time", "120", *[_port(a, self.port) for a in argv[1:]]]
        proc = subprocess.run(cmd, cwd=self.work, env=self.env, capture_output=True, text=True, timeout=TIMEOUT_S)
        assert proc.returncode == 0, f"{step}\ncurl exit status {proc.returncode}: {proc.stderr[-2000:]}"
        check_answer(step, argv, proc.stdout)


def check_answer(step: Step, argv: list[str], out: str) -> None:
    """A JSON answer without an error and with the keys the page shows; an event stream of such
    answers; or the HTTP status that `-w '%{http_code}'` prints."""
    if "-w" in argv or "--write-out" in argv:
        assert out.strip().startswith("2"), f"{step}: HTTP status {out.strip()!r}"
        return
    if out.startswith("data:"):
        events = [json.loads(line[5:]) for line in out.splitlines() if line.startswith("data:")
                  and line[5:].strip() != "[DONE]"]
        assert events, f"{step}: an empty event stream"
        answers = events
    else:
        try:
            answers = [json.loads(out)]
        except json.JSONDecodeError:
            pytest.fail(f"{step}: not JSON: {out[:2000]}")
    for answer in answers:
        assert "error" not in answer, f"{step}: {answer}"
        if step.answer is not None:
            missing = missing_keys(step.answer, answer)
            assert not missing, f"{step}: the answer lacks {missing} that the page shows: {answer}"


def missing_keys(shown: object, real: object, at: str = "") -> list[str]:
    if isinstance(shown, dict):
        if not isinstance(real, dict):
            return [at or "."]
        return [m for k, v in shown.items()
                for m in ([f"{at}.{k}"] if k not in real else missing_keys(v, real[k], f"{at}.{k}"))]
    if isinstance(shown, list) and shown:
        if not isinstance(real, list) or not real:
            return [at]
        return missing_keys(shown[0], real[0], f"{at}[0]")
    return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- fixtures -----------------------------------------------------------------------------------

def tiny_model(folder: Path, tokenizer_dir: Path) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer: 4 query heads and 1 KV head (tp 2 works), a long
    context (the pages' limits of up to 40000 tokens are within it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kiln.runtime.tokenizer import tokenizer_files

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=131072,
                      initializer_range=0.5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    for f in tokenizer_files(tokenizer_dir):
        shutil.copy(f, folder / f.name)
    return folder


def doc_env(hub_url: str, work: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMIX_", "PMI_", "TORCHELASTIC_", "HF_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(
        PATH=bin_dir + os.pathsep + env.get("PATH", ""), HF_ENDPOINT=hub_url, HF_HOME=str(work / ".hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", KILN_TP_TIMEOUT_S="60",
        OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1",
    )
    return env


@pytest.fixture(scope="module")
def runner(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    from deploy.hub_standin import serve_repos

    kiln = Path(sys.executable).parent / "kiln"
    if not kiln.exists():
        pytest.skip(f"no kiln script beside {sys.executable}")
    model = tiny_model(tmp_path_factory.mktemp("docs-model"), smollm2_hf)
    work = tmp_path_factory.mktemp("docs-work")
    with serve_repos(dict.fromkeys(REPOS, model)) as hub:
        r = Runner(work, doc_env(hub.url, work), str(kiln))
        try:
            yield r
        finally:
            r.kill_server()


# ---- the tests ----------------------------------------------------------------------------------

def runnable(path: Path) -> list[Step]:
    return [s for s in steps_of(path) if s.skip is None]


@pytest.mark.slow
@pytest.mark.parametrize("page", pages(), ids=page_id)
def test_page_runs(page: Path, runner: Runner):
    if not runnable(page):
        pytest.skip("no command to run on this page")
    before = len(runner.skipped)
    runner.run_through(page)
    if len(runner.skipped) > before:
        pytest.skip("; ".join(runner.skipped[before:]))


def test_every_line_is_known_or_marked():
    """Without running anything: each page parses, and each line is one the runner knows (or is marked)."""
    kiln = str(Path(sys.executable).parent / "kiln")
    count = 0
    for path in pages():
        for step in steps_of(path):
            if step.skip is not None:
                continue
            argv = argv_of(step, kiln)
            words = kiln_part(argv, kiln)
            assert argv[0] == "curl" or words is not None, f"{step}: mark it `# not run: REASON` or make it runnable"
            if words is not None:
                name, parser = parser_for(words[1:])
                assert name in EXPECT, f"{step}: no expectation for `kiln {name}`"
                parser.allow_abbrev = False  # a page spells every flag out
                with _no_exit(step):
                    parser.parse_args(words[len(name.split()) + 1:])  # the page's own flags, unchanged
                count += 1
    assert count >= 20


def test_no_command_line_outside_bash_blocks():
    """An indented or ```text command line would never run: every one is in a ```bash block of a page
    of `pages()`, and runs or says why it cannot."""
    listed = {page_id(p) for p in pages()}
    problems = [line for path in doc_files() for line in stray_command_lines(path)]
    problems += [f"{page_id(path)}: has ```bash blocks but is not in pages(): add it there"
                 for path in doc_files() if page_id(path) not in listed
                 and any(lang == "bash" for lang, *_ in fenced_blocks(path.read_text()))]
    assert not problems, "command lines that the docs test does not run: put each in a ```bash block " \
                         "(with `# not run: REASON` where it cannot run here)\n" + "\n".join(problems)


def test_stray_command_lines_are_found(tmp_path: Path):
    page = tmp_path / "commands" / "page.md"
    page.parent.mkdir()
    page.write_text(
        "# A page\n\n    kiln doctor\n\n- a list:\n\n       sudo curl -s https://example.com\n\n"
        "  kiln serve is named in prose\n\n```text\nOutput [Text 0 Beam 0]: hi\n$ mpirun -n 2 kiln run\n```\n\n"
        "```bash\nkiln run --engine_dir e\n    --tokenizer_dir t\n```\n\n```python\nimport kiln\n```\n\n"
        "```console\nKILN_HOME=/tmp python3 -m kiln\n```\n\n## Usage\n\n```text\nkiln run --engine_dir ENGINE_DIR\n```\n"
    )
    assert stray_command_lines(page) == [f"{page}:3: kiln doctor", f"{page}:7: sudo curl -s https://example.com",
                                         f"{page}:13: $ mpirun -n 2 kiln run",
                                         f"{page}:26: KILN_HOME=/tmp python3 -m kiln"]
    other = tmp_path / "README.md"  # the synopsis exception is docs/commands/'s only
    other.write_text("## Usage\n\n```text\nkiln run --engine_dir ENGINE_DIR\n```\n")
    assert stray_command_lines(other) == [f"{other}:4: kiln run --engine_dir ENGINE_DIR"]


def test_every_command_page_has_an_example_that_runs():
    kiln = str(Path(sys.executable).parent / "kiln")
    for command in command_docs().commands():
        if any(isinstance(a, argparse._SubParsersAction) for a in command.parser._actions):
            continue  # `kiln bench`: its kinds have the examples
        path = REPO / "docs" / "commands" / command.filename
        shown = {parser_for(words[1:])[0] for s in runnable(path)
                 if (words := kiln_part(argv_of(s, kiln), kiln)) is not None}
        assert command.name.removeprefix("kiln ") in shown, \
            f"{page_id(path)} has no example of `{command.name}` that the tests run"


def test_reader_follows_the_conventions(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\nkiln run --engine_dir e \\\n    --tokenizer_dir t\ncurl http://localhost:8000/v1/models\n```\n\n"
        '```json\n{"data": [{"id": "x"}]}\n```\n\n'
        "```bash\n# not run: needs Docker\ndocker build .\n```\n\n"
        "```bash\n# a comment\nnvidia-smi   # not run: needs a GPU\n```\n\n```text\nkiln nothing\n```\n"
    )
    steps = steps_of(Path(page))
    assert [(s.text, s.skip) for s in steps] == [
        ("kiln run --engine_dir e --tokenizer_dir t", None),
        ("curl http://localhost:8000/v1/models", None),
        ("docker build .", "needs Docker"),
        ("nvidia-smi", "needs a GPU"),
    ]
    assert steps[1].answer == {"data": [{"id": "x"}]}
    assert missing_keys(steps[1].answer, {"object": "list", "data": [{"id": "m", "object": "model"}]}) == []
    assert missing_keys(steps[1].answer, {"object": "list", "data": []}) == [".data"]
    assert substitute(["kiln", "serve", "--engine_dir", "e", "--tokenizer_dir", "t"], 1234)[-4:] == [
        "--device", "cpu", "--port", "1234"]
    assert substitute(["kiln", "quantize", "--model_dir", "m", "--output_dir", "o", "--qformat", "int4_awq",
                       "--calib_size", "8"], 1)[-6:] == ["--device", "cpu", "--calib_max_seq_length", "64",
                                                          "--eval_tokens", "4096"]
    assert _port("http://localhost:8000/v1/models", 4321) == "http://127.0.0.1:4321/v1/models"

    page.write_text("```console\n$ kiln doctor\n```\n")
    with pytest.raises(AssertionError, match="go in ```bash blocks"):
        steps_of(page)
    page.write_text("```bash\ndocker ps   # not run:\n```\n")
    with pytest.raises(AssertionError, match="needs a reason"):
        steps_of(page)


class _no_exit:
    """argparse exits on a bad flag: turn that into a failure that names the page's line."""

    def __init__(self, step: Step):
        self.step = step

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, value: BaseException | None, tb: object) -> bool:
        if kind is SystemExit and value is not None and value.code not in (0, None):
            pytest.fail(f"{self.step}: kiln refuses these flags (see the error above)")
        return False
