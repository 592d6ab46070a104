"""The `echodistill` command line: the library's jobs without ComfyUI."""

# One module per command group, each registering its commands on the parser:
#   train.py            train, smoke, inspect
#   after_training.py   sample, teacher-sample, eval, export
#   demo.py             demo (the job itself is echodistill.jobs.demo)
#   fleet.py            fleet run | status | report (echodistill.fleet, on Ray)
#   bench.py            bench sample | train | quality | quality-merge | lr-sweep | world-probe (echodistill.benchmarks)
#   terminal.py         what they share: the parser, progress bar, Ctrl-C as a clean stop, --set parsing
# The modules import the library inside their functions, and a command's options are added when that
# command is used: `echodistill --help` and argument errors load no torch and answer at once.

from __future__ import annotations

import argparse
import os
import sys
import warnings

from ..errors import EchoDistillError
from ..files import removing_new_folders_on_error
from . import after_training, bench, demo, fleet, train
from .terminal import SIGNALLED, Parser, exit_on_stop_signals

DESCRIPTION = "The `echodistill` command line: the library's jobs without ComfyUI."

# A library argument whose flag is not its name with dashes.
FLAG_NAMES = {"clip_path": "--clip", "dino_path": "--dino", "prompts": "--prompt", "out_dir": "--out"}


def flag_names(parser: argparse.ArgumentParser, parameters: tuple[str, ...]) -> dict[str, str]:
    """How the command `parser` spells each library argument: its flag, or `--set name=` for a training config
    field it takes through --set; arguments it has no way to give keep their Python name."""
    flags = {flag for action in parser._actions for flag in action.option_strings}
    names = {}
    for parameter in parameters:
        flag = FLAG_NAMES.get(parameter, "--" + parameter.replace("_", "-"))
        if flag in flags:
            names[parameter] = flag
        elif "--set" in flags:
            names[parameter] = f"--set {parameter}="
    return names


def in_flag_terms(message: str, parameters: tuple[str, ...], parser: argparse.ArgumentParser) -> str:
    """A library message naming `parameters` (`width=512`) in the terms of the command `parser` (`--width 512`)."""
    names = flag_names(parser, parameters)
    return EchoDistillError(message, parameters=tuple(names)).in_terms_of(names)


def build_parser() -> Parser:
    parser = Parser(prog="echodistill", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_demo_command(commands)
    train.add_smoke_command(commands)
    train.add_train_command(commands)
    after_training.add_commands(commands)
    train.add_inspect_command(commands)
    bench.add_bench_command(commands)
    fleet.add_fleet_command(commands)
    return parser


def in_user_terms(message: str, parameters: tuple[str, ...], parser: argparse.ArgumentParser,
                  args: argparse.Namespace) -> str:
    """A library message naming `parameters` as the user of the command `parser` gave them: a command that
    records its config values' sources (`args.value_sources`, terminal.ValueSources) names each as typed, from
    its --config file, or by its field name when the user never gave it; another command by its flags."""
    sources = getattr(args, "value_sources", None)
    if sources is not None:
        return sources.render(message, parameters, flag_names(parser, parameters))
    names = flag_names(parser, parameters)
    names.update({key: f"--set {key}=" for key in _set_keys(args) if key in names})  # as the user wrote it
    return EchoDistillError(message, parameters=tuple(names)).in_terms_of(names)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if category.__module__.startswith("echodistill.") and _COMMAND[0] is not None:  # the library's: in flag terms
        shown = in_user_terms(str(message), WARNING_PARAMETERS, _COMMAND[0], _COMMAND[1])
        if shown not in _SHOWN:  # once, however many times the config was built (and rebuilt with a change)
            _SHOWN.add(shown)
            print(f"warning: {shown}", file=sys.stderr)
    else:
        _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


_COMMAND: list = [None, None]  # the command running and its arguments, for _show_warning
_SHOWN: set[str] = set()  # the warnings this command printed
# what the library's warnings may name: SizeWarning (width, height), ConfigWarning (echo, echo_start, steps)
WARNING_PARAMETERS = ("width", "height", "echo", "echo_start", "steps")


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command parser that read `args`."""
    for dest in ("command", "bench_command"):
        chosen = getattr(args, dest, None)
        if chosen is not None:
            parser = parser._subparsers._group_actions[0].choices[chosen]
    return parser


_PYTHON_SHOWWARNING = warnings.showwarning


def _set_keys(args: argparse.Namespace) -> set[str]:
    """The config fields the user gave through --set KEY=VALUE."""
    return {item.partition("=")[0].strip() for item in getattr(args, "set", None) or []}


def _end_progress_lines() -> None:
    """Close live progress bars, so that an error starts its own line instead of following the bar's."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    # Before torch starts OpenMP: idle threads sleep instead of spinning (see training.threads).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    command = _COMMAND[0] = command_parser(parser, args)
    _COMMAND[1] = args
    _SHOWN.clear()
    previous, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        with exit_on_stop_signals(), removing_new_folders_on_error():  # a refused or stopped command leaves no folder behind
            status = args.run(args)
        # asked to stop where it could not (a finalizer swallowed the exit, or the last iteration was under way):
        # the work is done, and the status still says it was stopped
        return 128 + SIGNALLED[-1] if SIGNALLED and status == 0 else status
    except EchoDistillError as exc:
        _end_progress_lines()
        print(f"error: {in_user_terms(str(exc), exc.parameters, command, args)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the user named cannot be read or written: say which and why, no traceback
        from ..files import describe_os_error

        _end_progress_lines()
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{describe_os_error(exc)}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = previous
        _COMMAND[:] = [None, None]
