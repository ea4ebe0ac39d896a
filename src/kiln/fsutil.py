"""Writing artifact folders atomically: build in a sibling temporary folder, rename into place.

A killed command therefore never leaves a half-written checkpoint or engine where a later command
would load it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln.errors import KilnError


def is_kiln_artifact(folder: Path) -> bool:
    """A folder kiln wrote (an engine, a checkpoint, or a model folder converted from GGUF)."""
    if (folder / "engine.json").is_file() or (folder / ".kiln-gguf").is_file():
        return True
    try:
        return json.loads((folder / "config.json").read_text()).get("format", "").startswith("kiln-")
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `target`.

    An existing target is replaced only when it is empty or a kiln artifact, so a mistyped
    --output_dir never deletes a model folder or anything else of the user's.
    """
    target = Path(target).absolute()
    if target.is_dir() and any(target.iterdir()) and not is_kiln_artifact(target):
        raise KilnError(
            f"output folder {target} exists and is not a kiln checkpoint or engine: kiln will not "
            "replace it; choose another --output_dir or remove it first"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KilnError(f"cannot create the parent folder of {target}: {e.strerror}") from None
    if target.exists() and not target.is_dir():
        raise KilnError(f"output path {target} exists and is not a folder: choose another --output_dir")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the artifact gets normal permissions
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_file` (created if need be) for the block: two processes
    filling the same cache entry on first use take turns, and the second finds it done."""
    import fcntl

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file through a unique temporary name in its folder, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def require_distinct(source: Path, output: str | os.PathLike, source_flag: str) -> None:
    """Refuse an output folder that is, or is inside, the input folder."""
    src, out = Path(source).resolve(), Path(output).resolve()
    if out == src or src in out.parents:
        raise KilnError(f"--output_dir {output} is inside {source_flag} {source}: write to another folder")


def write_atomic(path: Path, text: str) -> None:
    """Write a file through a unique temporary name in its folder, then rename it into place."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise KilnError(f"cannot write {path}: {e.strerror}") from None


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise KilnError(f"{what}: {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KilnError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise KilnError(f"{what}: {path} must hold a JSON object")
    return data


def require_dir(path: str | os.PathLike, flag: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise KilnError(f"{flag} {path}: no such folder")
    return p
