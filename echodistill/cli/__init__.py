"""The `echodistill` command line: the library's jobs without ComfyUI."""

# One module per command group, each registering its commands on the parser:
#   train.py            train, smoke, inspect
#   after_training.py   sample, teacher-sample, eval, export
#   demo.py             demo (the job itself is echodistill.jobs.demo)
#   bench.py            bench sample | train | quality | quality-merge | lr-sweep (echodistill.benchmarks)
#   terminal.py         what they share: progress bar, Ctrl-C as a clean stop, --set parsing
# The modules import the library inside their functions: importing this package stays light.

from __future__ import annotations

import argparse
import os
import sys

from ..errors import EchoDistillError
from . import after_training, bench, demo, train

DESCRIPTION = "The `echodistill` command line: the library's jobs without ComfyUI."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echodistill", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_demo_command(commands)
    train.add_smoke_command(commands)
    train.add_train_command(commands)
    after_training.add_commands(commands)
    train.add_inspect_command(commands)
    bench.add_bench_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before torch starts OpenMP: idle threads sleep instead of spinning (see training.threads).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except EchoDistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
