"""`kiln download` against a local stand-in for the Hugging Face Hub (hub_standin.py), never the internet.

The choice of files is a pure function, tested on real repos' file lists; the command runs in a
subprocess with HF_ENDPOINT pointing at the stand-in (huggingface_hub reads it when imported), its own
HF_HOME, and no HF_TOKEN unless a test gives one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.hub import (
    MARKER,
    _escape_glob,
    choose_files,
    describe_size,
    fetch,
    plan_download,
    select,
    staging_folder,
)

from .hub_standin import HubStandIn, serve_repos

REPO = "mistralai/Mistral-7B-v0.3"
GATED = "mistralai/Mistral-7B-gated"
SHARD = "model-00001-of-00003.safetensors"
# huggingface_hub writes what it receives in 10 MiB chunks, so a dropped connection resumes from the last
# whole chunk: the big shard is 12 MiB and drops after 11, so that the second GET asks for bytes=10 MiB-.
CHUNK = 10 << 20

# The files of mistralai/Mistral-7B-v0.3 on the Hub (the weights twice: Hugging Face shards and Mistral's
# consolidated.safetensors; tokenizer twice: tokenizer.model and Mistral's tokenizer.model.v3).
MISTRAL_7B_V03 = [
    ".gitattributes", "README.md", "config.json", "consolidated.safetensors", "generation_config.json",
    "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
    "model.safetensors.index.json", "params.json", "special_tokens_map.json", "tokenizer.json",
    "tokenizer.model", "tokenizer.model.v3", "tokenizer_config.json",
]
MISTRAL_CHOICE = [
    "config.json", "generation_config.json", "model-00001-of-00003.safetensors",
    "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors", "model.safetensors.index.json",
    "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
]


# ---- the choice of files -------------------------------------------------------------------------
def test_mistral_takes_the_hugging_face_shards_not_consolidated():
    assert choose_files(MISTRAL_7B_V03, REPO) == MISTRAL_CHOICE


def test_bin_only_repo_takes_the_bin_shards_and_their_index():
    names = ["README.md", "config.json", "generation_config.json", "pytorch_model-00001-of-00002.bin",
             "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "training_args.bin",
             "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"]
    assert choose_files(names, "org/old") == [
        "added_tokens.json", "config.json", "generation_config.json", "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "special_tokens_map.json",
        "tokenizer.model", "tokenizer_config.json"]


def test_safetensors_win_over_bin_and_subfolders_are_left_out():
    names = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "vocab.json",
             "merges.txt", "original/consolidated.00.pth", "original/tokenizer.model", "onnx/model.onnx",
             "chat_template.jinja", "adapter_model.safetensors"]
    assert choose_files(names, "org/both") == [
        "chat_template.jinja", "config.json", "merges.txt", "model.safetensors", "tokenizer.json", "vocab.json"]


def test_gguf_only_repo_says_how_to_take_a_gguf():
    names = ["README.md", "config.json", "mistral-7b-v0.1.Q4_K_M.gguf", "mistral-7b-v0.1.Q8_0.gguf"]
    with pytest.raises(KilnError) as e:
        choose_files(names, "TheBloke/Mistral-7B-v0.1-GGUF")
    msg = str(e.value)
    assert "GGUF files only" in msg and "kiln convert --gguf" in msg
    assert "--allow-patterns mistral-7b-v0.1.Q4_K_M.gguf" in msg


@pytest.mark.parametrize("names, needle", [
    (["params.json", "consolidated.safetensors", "tokenizer.model.v3"], "Mistral's native weights"),
    (["model.safetensors", "tokenizer.json"], "no config.json"),
    (["config.json", "README.md"], "no model weights"),
])
def test_repos_kiln_cannot_use_are_refused_with_the_reason(names, needle):
    with pytest.raises(KilnError, match=needle):
        choose_files(names, "org/x")


def test_allow_patterns_override_the_choice():
    files = {n: i for i, n in enumerate(MISTRAL_7B_V03)}
    assert set(select(files, REPO, ["*.json"])) == {n for n in MISTRAL_7B_V03 if n.endswith(".json")}
    assert select(files, REPO, ["consolidated.*"]) == {"consolidated.safetensors": 3}
    with pytest.raises(KilnError, match=r"--allow-patterns \*\.gguf matches no file .* config\.json"):
        select(files, REPO, ["*.gguf"])


def test_exact_names_are_escaped_for_the_hubs_glob_filter():
    import fnmatch

    name = "weights[v2]*.safetensors"
    assert fnmatch.fnmatch(name, _escape_glob(name))
    assert not fnmatch.fnmatch("weights2.safetensors", _escape_glob(name))
    assert [describe_size(n) for n in (512, 1500, 14_496_000_000)] == ["512 B", "1.5 kB", "14.5 GB"]


# ---- the command, against the stand-in -----------------------------------------------------------
def _write_repo(folder: Path) -> dict[str, bytes]:
    """Mistral-7B-v0.3's file list with small contents (one 12 MiB shard, for the resume tests)."""
    folder.mkdir()
    contents = {}
    for i, name in enumerate(MISTRAL_7B_V03):
        size = (12 << 20) if name == SHARD else 1000 + 997 * i
        contents[name] = os.urandom(size) if name.endswith((".safetensors", ".model", ".v3")) else \
            (f'{{"name": "{name}"}}' + " " * size).encode()
        (folder / name).write_bytes(contents[name])
    return contents


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    folder = tmp_path_factory.mktemp("hub") / "Mistral-7B-v0.3"
    return folder, _write_repo(folder)


@pytest.fixture(scope="module")
def module_hub(repo) -> Iterator[HubStandIn]:
    with serve_repos({REPO: repo[0], GATED: repo[0]}, gated={GATED}) as hub:
        yield hub


@pytest.fixture
def hub(module_hub: HubStandIn) -> HubStandIn:
    module_hub.clear_requests()
    return module_hub


def download(hub: HubStandIn | str, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    base.update(HF_ENDPOINT=str(hub), HF_HOME=str(tmp_path / "hf-home"), NO_PROXY="127.0.0.1,localhost",
                HF_HUB_DISABLE_TELEMETRY="1")
    base.update(env)
    cmd = [sys.executable, "-m", "kiln", "download", *args]
    return subprocess.run(cmd, env=base, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, f"{proc.stdout}\n{proc.stderr}"
    return proc


def user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 1, no traceback, and a last line `kiln download: error: ...` naming each needle."""
    assert proc.returncode == 1, f"{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("kiln download: error: "), proc.stderr
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def files_in(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and ".cache" not in p.relative_to(folder).parts and p.name != MARKER}


def content_gets(hub: HubStandIn) -> set[str]:
    """Files whose bytes were asked for (GET on the Hub for small files, on the CDN for LFS ones)."""
    return {r.file for r in hub.requests if r.method == "GET" and r.file and r.status in (200, 206)}


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """For calls in this process: huggingface_hub's cache and token file in tmp_path, no HF_TOKEN."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "hf-home"


def fetch_in_process(hub: HubStandIn, out: Path, repo_id: str = REPO, **kwargs) -> Path:
    return fetch(plan_download(repo_id, endpoint=hub.url, **kwargs), out)


# The command in a subprocess: the environment variables as a user sets them.
def test_download_takes_the_engine_files_and_says_what_next(hub, repo, tmp_path, hf_home):
    out = tmp_path / "models" / "Mistral-7B-v0.3"
    proc = ok(download(hub, tmp_path, "--repo-id", REPO, "--output-dir", str(out)))
    assert files_in(out) == {n: repo[1][n] for n in MISTRAL_CHOICE}
    asked = {r.file for r in hub.requests if r.file}
    assert asked == set(MISTRAL_CHOICE)  # never consolidated.safetensors, params.json, tokenizer.model.v3
    assert f"{len(MISTRAL_CHOICE)} files" in proc.stdout
    assert describe_size(sum(len(repo[1][n]) for n in MISTRAL_CHOICE)) in proc.stdout
    assert f"downloaded to {out}" in proc.stdout
    assert f"kiln convert --model_dir {out}" in proc.stdout
    assert not staging_folder(out).exists()

    hub.clear_requests()  # again: everything is there, nothing is fetched
    assert fetch_in_process(hub, out) == out
    assert content_gets(hub) == set()
    assert files_in(out) == {n: repo[1][n] for n in MISTRAL_CHOICE}


def test_a_dropped_connection_is_resumed_with_a_range_request(hub, repo, tmp_path):
    out = tmp_path / "out"
    hub.drop_after(REPO, SHARD, CHUNK + (1 << 20))
    ok(download(hub, tmp_path, "--repo_id", REPO, "--output_dir", str(out)))
    gets = hub.requests_for(SHARD, "GET")
    assert [(g.status, g.range) for g in gets] == [(200, None), (206, f"bytes={CHUNK}-")]
    assert (out / SHARD).read_bytes() == repo[1][SHARD]


def test_a_gated_repo_needs_hf_token(hub, repo, tmp_path, hf_home, monkeypatch):
    out = tmp_path / "gated"
    user_error(download(hub, tmp_path, "--repo-id", GATED, "--output-dir", str(out)),
               f"repo {GATED} is gated", "accept its license", "HF_TOKEN")
    assert not out.exists() and not staging_folder(out).exists()
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(KilnError, match="has not been granted access"):
        fetch_in_process(hub, out, GATED)

    hub.clear_requests()
    ok(download(hub, tmp_path, "--repo-id", GATED, "--output-dir", str(out), HF_TOKEN=hub.token))
    assert files_in(out) == {n: repo[1][n] for n in MISTRAL_CHOICE}
    resolves = [r for r in hub.requests if r.server == "hub" and r.file]
    assert resolves and all(r.authorization == f"Bearer {hub.token}" for r in resolves)
    cdn = [r for r in hub.requests if r.server == "cdn"]
    assert cdn and all(r.authorization is None for r in cdn)  # the token never leaves the Hub


def test_offline_or_unreachable_hub_says_what_to_do(hub, tmp_path):
    out = tmp_path / "out"
    user_error(download(hub, tmp_path, "--repo-id", REPO, "--output-dir", str(out), HF_HUB_OFFLINE="1"),
               "HF_HUB_OFFLINE", "kiln convert --model_dir")
    port = closed_port()
    line = user_error(download(f"http://127.0.0.1:{port}", tmp_path, "--repo-id", REPO, "--output-dir", str(out)),
                      "cannot reach the Hugging Face Hub", f"127.0.0.1:{port}", "HF_ENDPOINT",
                      "kiln convert --model_dir")
    assert "Connect" in line
    assert not out.exists() and not staging_folder(out).exists()


def closed_port() -> int:
    """A local port with nothing listening on it (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The same code in this process (faster): kiln.hub with an explicit endpoint.
def test_an_interrupted_download_continues_where_it_stopped(hub, repo, tmp_path, hf_home):
    out = tmp_path / "out"
    hub.drop_after(REPO, SHARD, CHUNK + (1 << 20))
    hub.fail_with(REPO, SHARD, 503)  # the resumed GET fails too: the download gives up
    with pytest.raises(KilnError, match="503.*run the same command again"):
        fetch_in_process(hub, out)
    assert not out.exists()  # nothing that looks whole
    kept = set(files_in(staging_folder(out)))
    assert kept and SHARD not in kept

    hub.clear_requests()
    fetch_in_process(hub, out)
    assert content_gets(hub) == set(MISTRAL_CHOICE) - kept  # the finished files are not fetched again
    assert files_in(out) == {n: repo[1][n] for n in MISTRAL_CHOICE}
    assert not staging_folder(out).exists()


@pytest.mark.parametrize("repo_id, kwargs, needle", [
    ("mistralai/nope", {}, "repo mistralai/nope was not found on http://127.0.0.1:"),
    (REPO, {"revision": "v9.9"}, "--revision v9.9 was not found"),
    ("not/a/repo", {}, "is not a repo id"),
    (REPO, {"allow_patterns": ["*.gguf"]}, "--allow-patterns [*].gguf matches no file"),
])
def test_bad_repo_revision_or_patterns(hub, tmp_path, hf_home, repo_id, kwargs, needle):
    with pytest.raises(KilnError, match=needle):
        plan_download(repo_id, endpoint=hub.url, **kwargs)


def test_allow_patterns_and_a_folder_that_is_not_empty(hub, repo, tmp_path, hf_home):
    out = tmp_path / "json"
    fetch_in_process(hub, out, allow_patterns=["*.json", "tokenizer.model"])
    assert set(files_in(out)) == {n for n in MISTRAL_7B_V03 if n.endswith(".json")} | {"tokenizer.model"}
    assert json.loads((out / MARKER).read_text())["repo_id"] == REPO
    with pytest.raises(KilnError, match=f"holds a download of {REPO}"):
        fetch_in_process(hub, out, GATED)  # another repo is not mixed in

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(KilnError, match="--output-dir .* exists and is not empty"):
        fetch_in_process(hub, mine)
    assert files_in(mine) == {"notes.txt": b"keep me"}
