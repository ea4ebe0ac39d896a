"""The command reference agrees with the parser: docs/commands/*.md are what scripts/command_docs.py
writes today, and docs/trtllm-mapping.md names only flags and fields that kiln has (or, where it says
so, does not have).

A failure here after a CLI change means: run `python scripts/command_docs.py` (and fix the mapping).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from pathlib import Path

import pytest

from . import REPO, command_docs

REGENERATE = "run `python scripts/command_docs.py` and commit the pages it rewrites"
MAPPING = REPO / "docs" / "trtllm-mapping.md"
IGNORED = "accepted and ignored"
NOT_ACCEPTED = "not accepted"


# ---- the generated pages ---------------------------------------------------------------------------

def test_every_command_page_is_up_to_date():
    docs = command_docs()
    stale = [str(p.relative_to(REPO)) for p in docs.stale_pages()]
    assert not stale, f"out of date with kiln's parser: {', '.join(stale)}; {REGENERATE}"


def test_no_page_for_a_command_that_is_gone():
    stray = [str(p.relative_to(REPO)) for p in command_docs().stray_pages()]
    assert not stray, f"pages of commands kiln no longer has: {', '.join(stray)}; delete them"


def test_every_command_and_kind_has_a_page_naming_all_its_flags():
    docs = command_docs()
    names = [c.name for c in docs.commands()]
    assert {"kiln download", "kiln build", "kiln serve", "kiln bench latency", "kiln bench serve"} <= set(names)
    for command in docs.commands():
        page = (docs.PAGES_DIR / command.filename).read_text()
        assert f"# {command.name}\n" in page
        for action in command.parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in page, f"{command.filename} does not mention {flag}; {REGENERATE}"


def test_the_index_links_every_page():
    docs = command_docs()
    index = (docs.PAGES_DIR / docs.INDEX).read_text()
    for command in docs.commands():
        assert f"]({command.filename})" in index


# ---- the generator, on a parser of its own --------------------------------------------------------

def toy_parser(extra_flag: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("toast", help="toast an engine", description="Toast it; 100%% of it.")
    p.add_argument("--engine_dir", required=True, help="the engine | its folder")
    p.add_argument("--crisp", action="store_true", help="crisper")
    if extra_flag:
        p.add_argument("--butter", choices=("salted", "plain"), help="what to spread")
    return parser


def test_generator_keeps_the_hand_written_part_and_follows_the_parser(tmp_path: Path):
    docs = command_docs()
    page = tmp_path / "kiln-toast.md"

    first = docs.render_all(tmp_path, docs.commands(toy_parser()))
    assert docs.PLACEHOLDER in first[page]  # a new page gets a placeholder to replace
    assert "| `--engine_dir` | `ENGINE_DIR` | **Required.** the engine \\| its folder |" in first[page]
    assert "Toast it; 100% of it." in first[page]  # argparse's %% expanded
    assert "kiln toast --engine_dir ENGINE_DIR [--crisp]" in first[page]

    mine = "\n\nToasting makes engines warm.\n\n```bash\nkiln toast --engine_dir ./e\n```\n\n"
    page.write_text(first[page].replace(f"\n\n{docs.PLACEHOLDER}\n\n", mine))
    again = docs.render_all(tmp_path, docs.commands(toy_parser()))
    assert again[page] == page.read_text()  # regenerating changes nothing
    assert docs.handwritten_part(again[page]) == mine

    grown = docs.render_all(tmp_path, docs.commands(toy_parser(extra_flag=True)))
    assert docs.handwritten_part(grown[page]) == mine  # kept across a parser change
    assert "| `--butter` | `{salted,plain}` | what to spread |" in grown[page]
    assert "[--butter {salted,plain}]" in grown[page]


def test_check_mode_reports_a_stale_page_and_writing_fixes_it(tmp_path: Path, capsys: pytest.CaptureFixture):
    docs = command_docs()
    for path, text in docs.render_all().items():  # a copy of today's pages
        (tmp_path / path.name).write_text(text)
    assert docs.main(["--check", "--pages_dir", str(tmp_path)]) == 0
    build = tmp_path / "kiln-build.md"
    build.write_text(build.read_text().replace("`--max_batch_size`", "`--max_batches`"))
    assert docs.main(["--check", "--pages_dir", str(tmp_path)]) == 1
    assert "kiln-build.md: out of date" in capsys.readouterr().err
    assert docs.main(["--pages_dir", str(tmp_path)]) == 0
    assert "`--max_batch_size`" in build.read_text()
    assert docs.main(["--check", "--pages_dir", str(tmp_path)]) == 0


# ---- docs/trtllm-mapping.md -----------------------------------------------------------------------

def mapping_sections() -> list[tuple[str, list[list[str]]]]:
    """(heading, table rows as [TensorRT-LLM, kiln, what kiln does]) for each `##` section."""
    sections: list[tuple[str, list[list[str]]]] = []
    for line in MAPPING.read_text().splitlines():
        if line.startswith("## "):
            sections.append((line[3:], []))
        elif line.startswith("| ") and sections and not line.startswith(("| ---", "| TensorRT-LLM", "| tensorrtllm")):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            assert len(cells) == 3, f"trtllm-mapping.md: a row needs 3 cells: {line}"
            sections[-1][1].append(cells)
    return sections


def flags(cell: str) -> list[str]:
    return re.findall(r"`(--[\w-]+)", cell)


def parser_of(heading: str) -> argparse.ArgumentParser:
    found = re.search(r"`(kiln [a-z ]+)`", heading)
    assert found, f"trtllm-mapping.md: the heading '## {heading}' names no `kiln COMMAND`"
    parsers = {c.name: c.parser for c in command_docs().commands()}
    assert found[1] in parsers, f"trtllm-mapping.md: '## {heading}': kiln has no command {found[1]!r}"
    return parsers[found[1]]


def refuses(parser: argparse.ArgumentParser, flag: str) -> bool:
    """Whether the parser leaves `flag` unrecognized (argparse also takes unambiguous prefixes of flags)."""
    argv = []
    for action in parser._actions:
        if action.required and action.option_strings:
            argv += [action.option_strings[0], str(action.choices[0]) if action.choices else "1"]
    for group in parser._mutually_exclusive_groups:
        if group.required:
            argv += [group._group_actions[0].option_strings[0], "1"]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            _, unknown = parser.parse_known_args(argv + [flag])
    except SystemExit:  # the flag is known, and wants a value
        return False
    return flag in unknown


def cli_sections() -> list[tuple[str, list[list[str]]]]:
    return [(h, rows) for h, rows in mapping_sections() if "request fields" not in h]


def test_mapping_has_a_section_per_trtllm_tool():
    headings = " ".join(h for h, _ in mapping_sections())
    for command in ("kiln download", "kiln convert", "kiln quantize", "kiln build", "kiln run", "kiln serve",
                    "kiln bench throughput", "kiln bench latency"):
        assert f"`{command}`" in headings
    assert all(rows for _, rows in mapping_sections()), "a section of trtllm-mapping.md has no table"


def test_mapping_names_only_real_kiln_flags():
    for heading, rows in cli_sections():
        parser = parser_of(heading)
        own = set(parser._option_string_actions)
        for trt, kiln, what in rows:
            if kiln == NOT_ACCEPTED:
                continue
            for flag in flags(kiln):
                assert flag in own, f"trtllm-mapping.md, {heading}: kiln has no {flag}"
            if what.startswith(IGNORED):
                assert flags(trt) and flags(kiln) == flags(trt), f"{heading}: {trt} is accepted under its own name"


def test_flags_said_not_accepted_are_refused():
    checked = 0
    for heading, rows in cli_sections():
        parser = parser_of(heading)
        for trt, kiln, _ in rows:
            if kiln == NOT_ACCEPTED:
                for flag in flags(trt):
                    assert refuses(parser, flag), f"trtllm-mapping.md, {heading}: says {flag} is not accepted, " \
                                                  "but kiln takes it (or a flag it abbreviates)"
                    checked += 1
    assert checked > 50


def test_every_compatibility_flag_of_kiln_build_is_listed_as_ignored():
    from kiln.cli.build import _COMPAT_CHOICES, _COMPAT_SWITCHES

    rows = dict((h, r) for h, r in cli_sections())["`trtllm-build` → `kiln build`"]
    ignored = {f for trt, _, what in rows if what.startswith(IGNORED) for f in flags(trt)}
    compat = set(_COMPAT_SWITCHES) | set(_COMPAT_CHOICES)
    assert compat == ignored, f"kiln build's compatibility flags {sorted(compat)} against the mapping's " \
                              f"'accepted and ignored' ones {sorted(ignored)}"


def test_request_fields_match_the_kserve_request_model():
    from kiln.serve.kserve import GenerateRequest

    (heading, rows), = [(h, r) for h, r in mapping_sections() if "request fields" in h]
    declared = set(GenerateRequest.model_fields)
    named = set()
    for trt, kiln, what in rows:
        fields = re.findall(r"`(\w+)`", kiln)
        assert fields == re.findall(r"`(\w+)`", trt), f"{heading}: kiln takes {trt} under the same names"
        named |= set(fields)
        for field in fields:
            if what.startswith(IGNORED):
                if field not in declared:  # an undeclared field must pass validation untouched
                    body = GenerateRequest.model_validate({"text_input": "x", "max_tokens": 1, field: 1})
                    assert field not in body.model_dump()
            else:
                assert field in declared, f"{heading}: GenerateRequest has no field {field}"
    assert declared <= named, f"request fields missing from trtllm-mapping.md: {sorted(declared - named)}"
