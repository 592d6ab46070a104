"""The `echodistill` command line: the library's jobs without ComfyUI."""

# One module per command group, each registering its commands on the parser:
#   train.py            train, smoke, inspect
#   after_training.py   sample, teacher-sample, eval, export
#   demo.py             demo (the job itself is echodistill.jobs.demo)
#   bench.py            bench sample | train | quality | quality-merge | lr-sweep (echodistill.benchmarks)
#   terminal.py         what they share: the parser, progress bar, Ctrl-C as a clean stop, --set parsing
# The modules import the library inside their functions, and a command's options are added when that
# command is used: `echodistill --help` and argument errors load no torch and answer at once.

from __future__ import annotations

import sys
import warnings

from ..errors import EchoDistillError
from . import after_training, bench, demo, train
from .terminal import Parser

DESCRIPTION = "The `echodistill` command line: the library's jobs without ComfyUI."

# The library's errors and warnings name its Python arguments; here they are flags.
FLAGS = {"clip_path": "--clip", "dino_path": "--dino", "prompts": "--prompt", "overwrite": "--overwrite",
         "width": "--width ", "height": "--height ", "images": "--images"}


def in_flag_terms(message: str) -> str:
    """A library message with its `argument=` names rewritten as this command line's flags."""
    return EchoDistillError(message, parameters=tuple(FLAGS)).in_terms_of(FLAGS)


def build_parser() -> Parser:
    parser = Parser(prog="echodistill", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_demo_command(commands)
    train.add_smoke_command(commands)
    train.add_train_command(commands)
    after_training.add_commands(commands)
    train.add_inspect_command(commands)
    bench.add_bench_command(commands)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if category.__module__.startswith("echodistill."):  # the library's own: a plain line, in flag terms
        print(f"warning: {in_flag_terms(str(message))}", file=sys.stderr)
    else:
        _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


_PYTHON_SHOWWARNING = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return args.run(args)
    except EchoDistillError as exc:
        print(f"error: {exc.in_terms_of(FLAGS)}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = previous
