"""User mistakes that used to escape as tracebacks or destroy data."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.config import ModelConfig, SamplingParams
from kiln.errors import KilnError
from kiln.fsutil import require_distinct, write_atomic

LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}


def test_missing_config_key_names_it() -> None:
    hf = dict(LLAMA)
    del hf["hidden_size"]
    with pytest.raises(KilnError, match="hidden_size missing"):
        ModelConfig.from_hf(hf)


def test_heads_not_a_multiple_of_kv_heads() -> None:
    with pytest.raises(KilnError, match="num_attention_heads 4 is not a multiple of num_key_value_heads 3"):
        ModelConfig.from_hf(dict(LLAMA, num_key_value_heads=3))


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(KilnError, match="stop"):
        SamplingParams(stop=("",))


def test_output_inside_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KilnError, match="inside --checkpoint_dir"):
        require_distinct(tmp_path, tmp_path, "--checkpoint_dir")
    with pytest.raises(KilnError, match="inside --model_dir"):
        require_distinct(tmp_path, tmp_path / "sub", "--model_dir")
    require_distinct(tmp_path / "a", tmp_path / "b", "--model_dir")  # siblings are fine


def test_write_atomic_leaves_only_the_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    write_atomic(target, "one")
    write_atomic(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    with pytest.raises(KilnError, match="cannot write"):
        write_atomic(tmp_path / "missing-folder" / "x.json", "x")
