"""fsutil: all-or-nothing artifact folders and files, no temporary files left behind, and cache locks."""

import os
import stat
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.fsutil import atomic_dir, read_json, require_dir, write_json


class Boom(Exception):
    pass


def test_success_creates_target_with_content(tmp_path):
    target = tmp_path / "engine"
    with atomic_dir(target) as tmp:
        assert tmp.is_dir() and tmp.parent == tmp_path and tmp != target
        (tmp / "a.txt").write_text("A")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("B")
        assert not target.exists()  # nothing visible until the block ends
    assert (target / "a.txt").read_text() == "A"
    assert (target / "sub" / "b.txt").read_text() == "B"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_success_creates_missing_parents(tmp_path):
    target = tmp_path / "x" / "y" / "out"
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("1")
    assert (target / "f").read_text() == "1"
    assert [p.name for p in target.parent.iterdir()] == ["out"]


def test_success_replaces_existing_target(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "engine.json").write_text("{}")  # a kiln artifact may be replaced
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .old- or .tmp- folders


def test_refuses_to_replace_a_folder_kiln_did_not_write(tmp_path):
    target = tmp_path / "hf-model"
    target.mkdir()
    (target / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (target / "notes.txt").write_text("mine")
    with pytest.raises(KilnError, match="not a kiln checkpoint or engine"):
        with atomic_dir(target) as tmp:
            (tmp / "x").write_text("x")
    assert (target / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf-model"]


def test_exception_leaves_no_target(tmp_path):
    target = tmp_path / "engine"
    with pytest.raises(Boom):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"\0" * 10)
            raise Boom()
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_exception_keeps_existing_target_intact(tmp_path):
    target = tmp_path / "engine"
    target.mkdir()
    (target / "engine.json").write_text("{}")
    (target / "good.txt").write_text("good")
    with pytest.raises(Boom):
        with atomic_dir(target) as tmp:
            (tmp / "good.txt").write_text("half-written")
            (tmp / "extra").write_text("x")
            raise Boom()
    assert sorted(p.name for p in target.iterdir()) == ["engine.json", "good.txt"]
    assert (target / "good.txt").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_keyboard_interrupt_also_cleans_up(tmp_path):
    target = tmp_path / "t"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_target_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(KilnError, match="not a folder"):
        with atomic_dir(target):
            pass
    assert target.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_relative_target(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with atomic_dir("rel") as tmp:
        (tmp / "f").write_text("1")
    assert (tmp_path / "rel" / "f").read_text() == "1"


def test_target_gets_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("1")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "out").stat().st_mode)
    assert mode == 0o755  # not mkdtemp's private 0o700


def test_json_helpers(tmp_path):
    p = tmp_path / "c.json"
    write_json(p, {"a": 1, "b": [1, 2]})
    assert read_json(p, "--x") == {"a": 1, "b": [1, 2]}
    with pytest.raises(KilnError, match="does not exist"):
        read_json(tmp_path / "missing.json", "--x")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(KilnError, match="not valid JSON"):
        read_json(tmp_path / "bad.json", "--x")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(KilnError, match="JSON object"):
        read_json(tmp_path / "list.json", "--x")
    assert require_dir(tmp_path, "--d") == tmp_path
    with pytest.raises(KilnError, match="--d"):
        require_dir(tmp_path / "nope", "--d")


def test_exclusive_makes_a_second_holder_wait(tmp_path: Path) -> None:
    import threading
    import time

    from kiln.fsutil import exclusive

    lock = tmp_path / "cache" / ".entry.lock"
    events: list[str] = []
    held = threading.Event()

    def first() -> None:
        with exclusive(lock):
            held.set()
            time.sleep(0.3)
            events.append("first done")

    t = threading.Thread(target=first)
    t.start()
    held.wait(5)
    with exclusive(lock):  # a separate open file: blocks until the first holder lets go
        events.append("second in")
    t.join()
    assert events == ["first done", "second in"]


def test_write_bytes_atomic_leaves_only_the_file(tmp_path: Path) -> None:
    from kiln.fsutil import write_bytes_atomic

    target = tmp_path / "kjv.jsonl"
    write_bytes_atomic(target, b"old")
    write_bytes_atomic(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["kjv.jsonl"]
