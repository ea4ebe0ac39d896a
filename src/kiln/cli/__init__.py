"""`kiln` command line: one subcommand per step of the seed workflow, TensorRT-LLM's flag names.

A user's mistake (KilnError, bad flag) prints one line and exits with status 1 or 2; only a bug in
kiln shows a traceback.
"""

from __future__ import annotations

import argparse
import sys

from kiln import __version__
from kiln.cli import bench, build, convert, doctor, download, eval, quantize, quickstart, run, serve
from kiln.errors import KilnError

COMMANDS = (download, convert, quantize, build, run, serve, eval, bench, quickstart, doctor)


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


# Commands that load an engine: under torchrun or mpirun, every rank but 0 serves rank 0's steps.
ENGINE_COMMANDS = ("run", "serve", "eval", "bench", "quickstart")


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        place = _launched_rank()
        if place is not None and place.rank != 0:
            if args.command not in ENGINE_COMMANDS or getattr(args, "kind", None) == "serve":
                return 0  # rank 0 does this command's work alone
            from kiln.distributed.worker import run_worker

            return run_worker(place)
        return int(args.func(args) or 0)
    except KilnError as e:
        print(f"kiln {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kiln {args.command}: interrupted", file=sys.stderr)
        return 130


def _launched_rank():  # noqa: ANN202 - a Placement or None
    """This process's place in a torchrun / mpirun launch (None when started alone)."""
    from kiln.distributed.launch import from_environment

    place = from_environment()
    return place if place is not None and place.world_size > 1 else None
