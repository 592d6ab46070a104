"""What the commands share: the parser (help with defaults, arguments added when a command is used),
training progress in a terminal, Ctrl-C (or SIGTERM) as a clean stop, --set parsing."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ConfigError


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, unless it has none (None, a flag's False) or says it itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == [] or default is argparse.SUPPRESS
                or action.required or "default" in text or not action.option_strings):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%') or repr(shown)})"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose options are added the first time it parses or prints help.

    A command's options may need the library to list their choices (benchmark rows, model kinds):
    added lazily, `echodistill --help` and another command's argument errors never import them.
    """

    def __init__(self, *args, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._pending = add_arguments

    def populate(self) -> Parser:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        self.populate()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.populate()
        return super().format_help()

    def format_usage(self) -> str:
        self.populate()
        return super().format_usage()


def add_command(commands, name: str, *, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                run: Callable | None = None) -> Parser:
    """A subcommand whose options `add_arguments` adds when it is used; `run(args)` runs it."""
    parser = commands.add_parser(name, help=help, description=help, add_arguments=add_arguments)
    if run is not None:
        parser.set_defaults(run=run)
    return parser


class TerminalCallbacks:
    """tqdm progress with the current losses; the first Ctrl-C or SIGTERM asks for a clean, resumable stop."""

    def __init__(self, total: int, start: int = 0, preview_dir: Path | None = None):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, desc="EchoDistill", unit="it", dynamic_ncols=True)
        self.preview_dir = preview_dir
        self.stop_requested = False
        self.stop_signal = signal.SIGINT  # the signal that asked for the stop: the exit status says which

    def on_progress(self, step: int, total: int, logs: dict[str, float]) -> None:
        self.bar.n = step
        self.bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in logs.items() if k.startswith("loss/")})

    def on_preview(self, step: int, images) -> None:
        if self.preview_dir is None:
            return
        from ..imaging import save_grid

        save_grid(images, self.preview_dir / f"preview-{step:06d}.png")

    def should_stop(self) -> bool:
        return self.stop_requested

    def request_stop(self, signum: int = signal.SIGINT, _frame=None):
        if self.stop_requested:  # the second: stop now, unwinding (locks released), without a traceback
            raise SystemExit(128 + signum)
        SIGNALLED.append(signum)  # even if this run ends anyway, the command's exit status says it was asked to stop
        self.stop_requested, self.stop_signal = True, signum
        again = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.bar.write(f"stopping after this iteration; a checkpoint will be saved ({again} again to abort)")


@contextlib.contextmanager
def stop_on_ctrl_c(callbacks: TerminalCallbacks, resumable: bool = True) -> Iterator[None]:
    """While training: the first Ctrl-C or SIGTERM (a scheduler's or `kill`'s stop) stops cleanly after the
    iteration; the cancelled run says where to resume (when the command takes --resume: `resumable`) and exits
    128 + the signal (130 Ctrl-C, 143 SIGTERM). A stop asked for before (while the models loaded) stops the run
    at its first iteration."""
    from ..training.callbacks import TrainingCancelled

    previous = {signum: signal.signal(signum, callbacks.request_stop) for signum in STOP_SIGNALS}
    if SIGNALLED and not callbacks.stop_requested:
        callbacks.stop_requested, callbacks.stop_signal = True, SIGNALLED[-1]
    try:
        yield
    except TrainingCancelled as cancelled:
        callbacks.bar.close()
        where = f"resume with --resume {cancelled.checkpoint}" if resumable else f"its checkpoint: {cancelled.checkpoint}"
        print(f"stopped at step {cancelled.step}; {where}")
        raise SystemExit(128 + callbacks.stop_signal) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SIGNALLED: list[int] = []  # the stop signals this command received (main() exits 128 + the last one)


@contextlib.contextmanager
def exit_on_stop_signals() -> Iterator[None]:
    """SIGTERM or Ctrl-C outside training ends the command by SystemExit(128 + signal), without a traceback: held
    output locks are released and half-made folders removed on the way out (Python's default for SIGTERM is to
    die on the spot, for Ctrl-C a KeyboardInterrupt traceback). `SIGNALLED` records them, in case the exception
    is swallowed where Python ignores exceptions (a finalizer)."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def stop(signum, _frame):
        SIGNALLED.append(signum)  # kept even where the exception below is swallowed (raised inside a __del__)
        raise SystemExit(128 + signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    SIGNALLED.clear()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def parse_overrides(pairs: list[str]) -> dict:
    """--set key=value pairs; values are JSON where they parse as JSON, strings otherwise."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair}: write key=value, e.g. --set echo=false")
        if value.strip().lower() in ("true", "false"):  # Python's True / False too, as the messages may show them
            overrides[key] = value.strip().lower() == "true"
            continue
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
