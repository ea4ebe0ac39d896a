"""The all-reduce settings (distributed/symm.py) are checked before any group work, on any device."""

from __future__ import annotations

import pytest

from kiln.distributed.symm import make
from kiln.errors import KilnError


@pytest.mark.parametrize(("name", "value", "named"), [
    ("KILN_TP_ALLREDUCE", "fast", "auto"),
    ("KILN_TP_SYMM_MAX_BYTES", "8M", "whole number of bytes"),
    ("KILN_TP_SYMM_MAX_BYTES", "8", "at least 16"),
])
def test_a_bad_setting_names_itself_and_the_choices(monkeypatch, name, value, named):
    monkeypatch.setenv(name, value)
    with pytest.raises(KilnError, match=name) as err:
        make(None, "cpu", 0)
    assert value in str(err.value) and named in str(err.value)


@pytest.mark.parametrize("choice", ["auto", "symm", "nccl"])
def test_the_cpu_always_uses_the_group_collectives(monkeypatch, choice):
    monkeypatch.setenv("KILN_TP_ALLREDUCE", choice)
    monkeypatch.setenv("KILN_TP_SYMM_MAX_BYTES", "65536")
    assert make(None, "cpu", 0) is None
