"""`kiln` command line: one subcommand per step of the seed workflow, TensorRT-LLM's flag names.

A user's mistake (KilnError, bad flag) prints one line and exits with status 1 or 2; only a bug in
kiln shows a traceback.
"""

from __future__ import annotations

import argparse
import sys

from kiln import __version__
from kiln.cli import bench, build, convert, eval, quantize, quickstart, run, serve
from kiln.errors import KilnError

COMMANDS = (convert, quantize, build, run, serve, eval, bench, quickstart)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Take a Hugging Face LLM, convert it, build an engine for this machine, run it.",
    )
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KilnError as e:
        print(f"kiln {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kiln {args.command}: interrupted", file=sys.stderr)
        return 130
