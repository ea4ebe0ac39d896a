"""--calib_dataset: local files, and Hugging Face datasets by name (a stand-in `datasets` module: no network)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.quant.calib import load_text


class _Feature:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class _Dataset:
    def __init__(self, columns: dict[str, list]) -> None:
        self._columns = columns
        self.column_names = list(columns)
        self.features = {k: _Feature("string" if isinstance(v[0], str) else "int64") for k, v in columns.items()}

    def __getitem__(self, column: str) -> list:
        return self._columns[column]


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, tables: dict[tuple[str, str | None], dict[str, list]]) -> list:
    calls: list = []

    def load_dataset(repo: str, config: str | None = None, split: str = "train") -> _Dataset:
        calls.append((repo, config, split))
        if (repo, config) not in tables:
            raise ConnectionError("no network")
        return _Dataset(tables[(repo, config)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_org_name_and_config_read_the_text_column(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_datasets(monkeypatch, {("org/set", "cfg"): {"id": [1, 2], "text": ["one", "two"]}})
    assert load_text("org/set:cfg", "calib") == "one\ntwo"
    assert calls == [("org/set", "cfg", "train")]


def test_a_short_name_is_the_dataset_other_tools_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_datasets(monkeypatch, {("abisee/cnn_dailymail", "3.0.0"): {"article": ["a story"],
                                                                             "highlights": ["short"]}})
    assert load_text("cnn_dailymail", "calib") == "a story"
    assert calls == [("abisee/cnn_dailymail", "3.0.0", "train")]


def test_without_a_text_column_the_first_string_column_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_datasets(monkeypatch, {("org/qa", None): {"n": [1], "question": ["why?"]}})
    assert load_text("org/qa", "calib") == "why?"


def test_unreachable_or_textless_datasets_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_datasets(monkeypatch, {("org/numbers", None): {"n": [1, 2]}})
    with pytest.raises(KilnError, match=r"mydata: not a local file.*cannot be loaded.*no network.*local"):
        load_text("mydata", "calib")
    with pytest.raises(KilnError, match=r"org/numbers: the dataset has no text column \(columns: n\)"):
        load_text("org/numbers", "calib")


def test_without_the_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(KilnError, match=r"wikitext: not a local file.*pip install datasets"):
        load_text("wikitext", "calib")


def test_missing_local_files_are_named_as_files(tmp_path: Path) -> None:
    with pytest.raises(KilnError, match=r"no such file \(use kjv, a \.txt or a \.jsonl file\)"):
        load_text(str(tmp_path / "calib.txt"), "calib")
    (tmp_path / "notes.jsonl").write_text('{"text": "hello"}\n"world"\n')
    assert load_text(str(tmp_path / "notes.jsonl"), "calib") == "hello\nworld"
