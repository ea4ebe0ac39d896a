"""kiln doctor: what this machine has for kiln and, given an engine, whether it can run here (kiln.doctor)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="check this machine (GPUs, driver, CUDA, torch, Triton) and whether an engine can run here",
        description="Report what this machine offers kiln: Python, torch and Triton versions, the GPUs PyTorch "
        "sees (compute capability, memory), the driver and CUDA versions, and whether Triton compiles and runs "
        "a kernel here. With --engine_dir, also whether that engine can run here and, if not, why. Each check "
        "is OK, WARN or FAIL; the exit status is 1 when any check fails.",
    )
    p.add_argument("--engine_dir", "--engine-dir", dest="engine_dir", help="an engine folder to check against this machine")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object instead of text")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from kiln.doctor import run_doctor

    report = run_doctor(args.engine_dir)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_text())
    return 0 if report.ok else 1
