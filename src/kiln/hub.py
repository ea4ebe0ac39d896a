"""Downloading a model from the Hugging Face Hub: only the files an engine needs, through huggingface_hub.

A model repo often holds its weights twice (Mistral's `consolidated.safetensors` beside the Hugging
Face shards, `.bin` beside `.safetensors`) and files no engine reads (README, GGUF, ONNX, Mistral's own
tokenizer). `choose_files` keeps one copy, in the layout `kiln convert` reads; huggingface_hub does the
transfer: listing, progress bars, the token from HF_TOKEN, the endpoint from HF_ENDPOINT, and a Range
request that resumes a file whose connection dropped.

The files go to a staging folder beside the output folder (`.NAME.download`), renamed into place once
every file is complete, so an interrupted download never leaves a folder that looks whole. Running the
same command again continues in the staging folder: files already complete are not fetched again. A
hidden `.kiln-download` file says which repo a folder holds, so that a later download of the same repo
updates it in place and one of another repo is refused.
huggingface_hub's errors become one-line KilnErrors that say what to do.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError
from kiln.fsutil import write_atomic

CONFIG_FILES = frozenset({"config.json", "generation_config.json"})
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
    "chat_template.jinja", "chat_template.json",
})
_DUPLICATE_PREFIXES = ("consolidated", "adapter_")  # Mistral's native copy; LoRA adapters
_BIN_PREFIXES = ("pytorch_model", "model")  # not training_args.bin, optimizer.bin, ...
MARKER = ".kiln-download"  # in a downloaded folder: which repo, revision and files it holds


@dataclass(frozen=True)
class DownloadPlan:
    repo_id: str
    revision: str
    commit: str
    files: dict[str, int]  # name in the repo -> size in bytes
    endpoint: str

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def bin_weights(self) -> bool:
        return any(n.endswith(".bin") for n in self.files) and not any(n.endswith(".safetensors") for n in self.files)


# ---- which files -----------------------------------------------------------------------------
def choose_files(names: Iterable[str], repo_id: str) -> list[str]:
    """The files of a repo an engine needs: config, tokenizer, and one copy of the weights.

    Weights are the Hugging Face `*.safetensors` (with their index) when the repo has them, else the
    PyTorch `*.bin` (with theirs), never both; Mistral's `consolidated.*` and subfolders such as
    `original/` are duplicates in other layouts and are left out.
    """
    names = list(names)
    top = [n for n in names if "/" not in n]
    weights = _weight_files(top, names, repo_id)
    if "config.json" not in top:
        raise KilnError(
            f"repo {repo_id} has no config.json at its top level, so it is not a Hugging Face transformers "
            "model that kiln can convert; choose the files yourself with --allow-patterns if you know better"
        )
    return sorted({n for n in top if n in CONFIG_FILES or n in TOKENIZER_FILES} | set(weights))


def _weight_files(top: list[str], names: list[str], repo_id: str) -> list[str]:
    def own(n: str) -> bool:
        return not n.startswith(_DUPLICATE_PREFIXES)

    safetensors = [n for n in top if n.endswith(".safetensors") and own(n)]
    if safetensors:
        return safetensors + [n for n in top if n.endswith(".safetensors.index.json") and own(n)]
    bins = [n for n in top if n.endswith(".bin") and n.startswith(_BIN_PREFIXES)]
    if bins:
        return bins + [n for n in top if n.endswith(".bin.index.json") and n.startswith(_BIN_PREFIXES)]
    ggufs = [n for n in names if n.endswith(".gguf")]
    if ggufs:
        shown = ", ".join(ggufs[:4]) + (f" and {len(ggufs) - 4} more" if len(ggufs) > 4 else "")
        raise KilnError(
            f"repo {repo_id} holds GGUF files only ({shown}), no Hugging Face weights: fetch one with "
            f"--allow-patterns {ggufs[0]} and convert it with `kiln convert --gguf FILE --output_dir DIR`"
        )
    if any(n.startswith("consolidated") for n in top):
        raise KilnError(
            f"repo {repo_id} has only Mistral's native weights (consolidated.*), not the Hugging Face layout "
            "(model-*.safetensors) that kiln converts; look for the repo's transformers version"
        )
    raise KilnError(f"repo {repo_id} holds no model weights (*.safetensors or *.bin) at its top level")


def select(files: dict[str, int], repo_id: str, allow_patterns: list[str] | None) -> dict[str, int]:
    """The chosen files and their sizes: `choose_files`, or the files matching `allow_patterns`."""
    if not allow_patterns:
        return {n: files[n] for n in choose_files(files, repo_id)}
    chosen = {n: s for n, s in files.items() if any(fnmatch.fnmatch(n, p) for p in allow_patterns)}
    if not chosen:
        shown = ", ".join(sorted(files)[:12]) + (" ..." if len(files) > 12 else "")
        raise KilnError(f"--allow-patterns {' '.join(allow_patterns)} matches no file of repo {repo_id}; "
                        f"it holds: {shown}")
    return chosen


# ---- the Hub ---------------------------------------------------------------------------------
def plan_download(
    repo_id: str, revision: str = "main", allow_patterns: list[str] | None = None, endpoint: str | None = None
) -> DownloadPlan:
    """Resolve `revision` to a commit and choose the files to fetch (two small API calls).

    `endpoint`: the Hub's address; by default huggingface_hub's, from HF_ENDPOINT.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.hf_api import RepoFile

    _refuse_offline(constants)
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint)
    try:
        commit = api.model_info(repo_id, revision=revision).sha
        entries = api.list_repo_tree(repo_id, revision=commit, recursive=True)
        files = {e.path: int(e.size) for e in entries if isinstance(e, RepoFile)}
    except Exception as e:  # noqa: BLE001 - translated, or re-raised when not the Hub's
        raise translate_error(e, repo_id, revision, endpoint, listing=True) from None
    return DownloadPlan(repo_id, revision, commit, select(files, repo_id, allow_patterns), endpoint)


def fetch(plan: DownloadPlan, output_dir: str | os.PathLike) -> Path:
    """Download the plan's files into `output_dir` (through its staging folder); returns the folder."""
    from huggingface_hub import snapshot_download

    target, work = _work_folder(Path(output_dir), plan.repo_id)
    work.mkdir(parents=True, exist_ok=True)
    write_atomic(work / MARKER, json.dumps({"repo_id": plan.repo_id, "revision": plan.revision,
                                            "commit": plan.commit, "files": sorted(plan.files)}, indent=2) + "\n")
    try:
        snapshot_download(
            plan.repo_id, revision=plan.commit, local_dir=work, endpoint=plan.endpoint,
            allow_patterns=[_escape_glob(n) for n in plan.files],
        )
    except Exception as e:  # noqa: BLE001
        if work != target and not any(p.name not in (".cache", MARKER) for p in work.iterdir()):
            shutil.rmtree(work, ignore_errors=True)  # nothing to continue from
        raise translate_error(e, plan.repo_id, plan.revision, plan.endpoint, listing=False) from None
    short = [n for n, size in plan.files.items() if not (work / n).is_file() or (work / n).stat().st_size != size]
    if short:
        raise KilnError(f"{len(short)} file(s) of {plan.repo_id} are incomplete ({', '.join(short[:3])}): "
                        "run the same command again to finish them")
    if work != target:
        if target.is_dir():
            target.rmdir()  # empty: _work_folder checked
        os.replace(work, target)
    return target


def staging_folder(target: Path) -> Path:
    return target.with_name(f".{target.name}.download")


def _work_folder(output_dir: Path, repo_id: str) -> tuple[Path, Path]:
    """(the output folder, the folder to download into): its staging folder, or the output folder itself
    when it holds an earlier download of the same repo, which huggingface_hub brings up to date."""
    target = output_dir.absolute()
    if target.exists() and not target.is_dir():
        raise KilnError(f"--output-dir {output_dir} exists and is not a folder: choose another --output-dir")
    if target.is_dir() and any(target.iterdir()):
        earlier = _downloaded_repo(target)
        if earlier == repo_id:
            return target, target
        what = f"holds a download of {earlier}" if earlier else "exists and is not empty"
        raise KilnError(f"--output-dir {output_dir} {what}: kiln downloads into a new or empty folder (or "
                        f"an earlier download of {repo_id}); choose another --output-dir or remove it first")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KilnError(f"cannot create the parent folder of --output-dir {output_dir}: {e.strerror}") from None
    staging = staging_folder(target)
    if staging.is_dir() and _downloaded_repo(staging) != repo_id:
        shutil.rmtree(staging)  # an abandoned download of another repo: kiln's own hidden folder
    return target, staging


def _downloaded_repo(folder: Path) -> str | None:
    """The repo whose download `folder` holds (from kiln's marker file), or None."""
    try:
        return json.loads((folder / MARKER).read_text()).get("repo_id")
    except (OSError, ValueError, AttributeError):
        return None


def _escape_glob(name: str) -> str:
    """An allow pattern that matches exactly `name` (fnmatch's special characters bracketed)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _refuse_offline(constants) -> None:
    offline = constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE
    if offline:
        raise KilnError(
            "HF_HUB_OFFLINE is set, and kiln download needs the network: unset it (or set HF_HUB_OFFLINE=0); "
            "without a network, download the model folder on another machine, copy it here and pass it to "
            "`kiln convert --model_dir DIR`"
        )


# ---- errors ----------------------------------------------------------------------------------
def translate_error(e: Exception, repo_id: str, revision: str, endpoint: str, listing: bool) -> Exception:
    """A KilnError that says what to do for an error of huggingface_hub's; other errors unchanged."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    again = "run the same command again to continue (files already complete are kept)"
    page = f"{endpoint}/{repo_id}"
    if isinstance(e, GatedRepoError):  # before RepositoryNotFoundError: a subclass of it
        if get_token():
            return KilnError(f"repo {repo_id} is gated and the account of HF_TOKEN has not been granted access: "
                             f"accept its license on {page} with that account, then try again")
        return KilnError(f"repo {repo_id} is gated: accept its license on {page} and set HF_TOKEN to an access "
                         "token of that account (huggingface.co/settings/tokens), then try again")
    if isinstance(e, RepositoryNotFoundError):
        return KilnError(f"repo {repo_id} was not found on {endpoint}: check --repo-id (ORG/NAME, as in the "
                         "model's address on huggingface.co); a private repo also needs HF_TOKEN")
    if isinstance(e, RevisionNotFoundError):
        return KilnError(f"--revision {revision} was not found in repo {repo_id}: give a branch, tag or commit "
                         "that exists (default main)")
    if isinstance(e, HFValidationError):
        return KilnError(f"--repo-id {repo_id!r} is not a repo id: use ORG/NAME, as in the model's address on "
                         "huggingface.co")
    if isinstance(e, OfflineModeIsEnabled):
        return KilnError("HF_HUB_OFFLINE is set, and kiln download needs the network: unset it")
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "error")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "try again later" if listing else f"try again later: {again}"
        return KilnError(f"the Hub at {endpoint} answered HTTP {status} for {repo_id} ({first}): {hint}")
    if isinstance(e, _transport_errors()) or isinstance(e, LocalEntryNotFoundError):
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}"
        if listing:
            return KilnError(
                f"cannot reach the Hugging Face Hub at {endpoint} ({reason}): check the network and any proxy "
                "(HTTPS_PROXY), or point HF_ENDPOINT at a mirror; without a network, download the model folder "
                "on another machine, copy it here and pass it to `kiln convert --model_dir DIR`"
            )
        return KilnError(f"the transfer from {endpoint} broke off ({reason}): {again}")
    if isinstance(e, OSError) and "Consistency check failed" in str(e):
        return KilnError(f"a file of {repo_id} arrived incomplete: {again}")
    if isinstance(e, OSError) and e.strerror:
        return KilnError(f"cannot write the download ({e.strerror}{f': {e.filename}' if e.filename else ''}); "
                         "free some disk space or choose another --output-dir")
    return e


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The network errors of the HTTP client huggingface_hub uses (httpx2, httpx or requests, by version)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(found)


def describe_size(nbytes: int) -> str:
    """Bytes as the Hub's pages show them (powers of 1000)."""
    if nbytes < 1000:
        return f"{nbytes} B"
    exponent = 1
    while exponent < 4 and nbytes >= 1000 ** (exponent + 1):
        exponent += 1
    return f"{nbytes / 1000 ** exponent:.1f} {('kB', 'MB', 'GB', 'TB')[exponent - 1]}"
