"""Argument types shared by the subcommands, with messages that name the flag and the limit."""

from __future__ import annotations

import argparse


def _number(text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def _at_least(value: int | float, low: int | float, limit: str) -> None:
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is invalid: it must be {limit}")


def positive_int(text: str) -> int:
    value = int(_number(text, int))
    _at_least(value, 1, "1 or more")
    return value


def non_negative_int(text: str) -> int:
    value = int(_number(text, int))
    _at_least(value, 0, "0 or more")
    return value


def seed_int(text: str) -> int:
    """A random seed: any integer that fits in 64 bits (what torch.Generator.manual_seed takes)."""
    value = int(_number(text, int))
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{value} is invalid: it must fit in 64 bits (0 to {2**64 - 1})")
    return value


def non_negative_float(text: str) -> float:
    value = float(_number(text, float))
    _at_least(value, 0, "0 or more")
    return value


def enable_disable(text: str) -> bool:
    """TensorRT-LLM's `enable`/`disable` switch values (also true/false)."""
    value = text.lower()
    if value in ("enable", "true", "1", "yes"):
        return True
    if value in ("disable", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is invalid: use enable or disable")


def add_switch(parser: argparse.ArgumentParser, flag: str, default: bool, help: str) -> None:
    """`--flag`, `--flag enable` or `--flag disable`, as trtllm-build accepts them."""
    parser.add_argument(
        flag, type=enable_disable, nargs="?", const=True, default=default, metavar="{enable,disable}",
        help=f"{help} (default: {'enable' if default else 'disable'})",
    )
