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


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `target` (a previous one is removed)."""
    target = Path(target).absolute()
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
