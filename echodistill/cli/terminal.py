"""What the commands share: the parser (help with defaults, arguments added when a command is used, numbers
read or refused in one line), training progress in a terminal, Ctrl-C (or SIGTERM) as a clean stop, --set
parsing and where each config value came from."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ConfigError, EchoDistillError, unknown_name, valid_names


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

    def add_argument(self, *names, **kwargs):
        """An option taking a list (`nargs` "+" or "*") is refused when given twice: argparse would keep the last
        list alone, so `--seeds 0 --seeds 1` would silently run seed 1 only."""
        if kwargs.get("nargs") in ("+", "*") and "action" not in kwargs and names and names[0].startswith("-"):
            kwargs["action"] = _ListGivenOnce
        return super().add_argument(*names, **kwargs)

    def error(self, message: str):
        """A value a number flag's type refused (`whole_number`, `number`) is said in one `error:` line, as the
        commands' own errors are; any other argument error as argparse says it, after the usage."""
        said = message.partition(": ")[2]
        if said in _REFUSED_NUMBERS:
            self.exit(2, f"error: {said}\n")
        super().error(message)


_REFUSED_NUMBERS: set[str] = set()  # what `whole_number` and `number` refused, in their words (for Parser.error)


class _ListGivenOnce(argparse.Action):
    """Store an option's list, refusing the option a second time in one command line (Parser.add_argument)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_lists_given", set())
        if self.dest in given:
            flag = self.option_strings[-1]
            raise argparse.ArgumentError(self, _refused(f"{option_string} given twice: list every value after one "
                                                        f"{flag}, e.g. {flag} A B").args[0])
        given.add(self.dest)
        setattr(namespace, self.dest, values)


def _refused(message: str) -> argparse.ArgumentTypeError:
    _REFUSED_NUMBERS.add(message)
    return argparse.ArgumentTypeError(message)


def whole_number(flag: str, what: str, example: int) -> Callable[[str], int]:
    """argparse type of `flag`: the int its text spells. Anything else (nan, inf, 1.5, 1e3, ten) is refused in
    one line naming the flag, saying what to give and how: "--steps nan: give a whole number of training steps,
    e.g. --steps 400" (`what`: "a whole number of training steps"). Its range is checked where it is used (a
    training config field's by TrainConfig, naming the flag)."""
    return _number_type(int, "whole number", flag, what, example)


def number(flag: str, what: str, example: float) -> Callable[[str], float]:
    """argparse type of `flag`: the float its text spells (nan and inf too: the command checks the range and
    says what to give); text that is no number is refused in one line, as `whole_number` refuses it."""
    return _number_type(float, "number", flag, what, example)


def _number_type(convert: Callable[[str], int | float], name: str, flag: str, what: str, example) -> Callable:
    def parse(text: str):
        try:
            # int() and float() read digit separators ("0_001" would be 1) and any script's digits ("٣" is 3)
            if "_" in text or not text.isascii():
                raise ValueError(text)
            return convert(text)
        except ValueError:
            raise _refused(f"{flag} {text}: give {what}, e.g. {flag} {example}") from None

    parse.__name__ = name  # argparse names the type by it in its own messages
    return parse


MAX_THREADS = 1024  # CPU threads a --threads flag may ask for: more is a typo (and each is an OS thread)


def check_count(flag: str, value: int | None, low: int, high: int, what: str) -> None:
    """Refuse `flag`'s value outside low..high (None: not given) in one line: "--threads 0: give 1 to 1,024 CPU
    threads". Raises EchoDistillError."""
    if value is not None and not low <= value <= high:
        raise EchoDistillError(f"{flag} {value}: give {low} to {high:,} {what}")


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
        self.trained = False  # training over: a stop asked for now has no iteration to wait for

    def on_progress(self, step: int, total: int, logs: dict[str, float]) -> None:
        self.bar.n = step
        self.bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in logs.items() if k.startswith("loss/")})

    def on_preview(self, step: int, images) -> None:
        if self.preview_dir is None:
            return
        from ..imaging import save_grid

        save_grid(images, self.preview_dir / f"preview-{step:06d}.png")

    def on_train_end(self, step: int) -> None:
        self.bar.n = step
        self.bar.close()  # what follows (a bundle written, pictures drawn) is not an iteration of the bar
        self.trained = True

    def should_stop(self) -> bool:
        return self.stop_requested

    def request_stop(self, signum: int = signal.SIGINT, _frame=None):
        if self.stop_requested or self.trained:  # the second, or after training: stop now, unwinding (locks
            SIGNALLED.append(signum)  # released), without a traceback
            raise SystemExit(128 + signum)
        SIGNALLED.append(signum)  # even if this run ends anyway, the command's exit status says it was asked to stop
        self.stop_requested, self.stop_signal = True, signum
        again = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.bar.write(f"stopping after this iteration; a checkpoint will be saved ({again} again to abort)")


@contextlib.contextmanager
def stop_on_ctrl_c(callbacks: TerminalCallbacks, resumable: bool = True, kept: bool = True) -> Iterator[None]:
    """While training: the first Ctrl-C or SIGTERM (a scheduler's or `kill`'s stop) stops cleanly after the
    iteration; the cancelled run says where to resume (when the command takes --resume: `resumable`; where its
    checkpoint is when `kept`, not in a temporary folder about to be removed) and exits 128 + the signal (130
    Ctrl-C, 143 SIGTERM). A stop asked for before (while the models loaded) stops the run at its first iteration."""
    from ..training.callbacks import TrainingCancelled

    previous = {signum: signal.signal(signum, callbacks.request_stop) for signum in STOP_SIGNALS}
    if SIGNALLED and not callbacks.stop_requested:
        callbacks.stop_requested, callbacks.stop_signal = True, SIGNALLED[-1]
    try:
        yield
    except TrainingCancelled as cancelled:
        callbacks.bar.close()
        if resumable:
            where = f"; resume with --resume {cancelled.checkpoint}"
        else:
            where = f"; its checkpoint: {cancelled.checkpoint}" if kept else " (in a temporary folder, now removed)"
        print(f"stopped at step {cancelled.step}{where}")
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
    """--set key=value pairs; values are JSON where they parse as JSON, strings otherwise. A key given twice with
    different values is refused (ConfigError naming both), never settled silently by the order."""
    overrides, written = {}, {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {pair}: write key=value, e.g. --set echo=false")
        if value.strip().lower() in ("true", "false"):  # Python's True / False too, as the messages may show them
            parsed = value.strip().lower() == "true"
        else:
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = value
        parsed = tuple(parsed) if isinstance(parsed, list) else parsed
        if key in overrides and not _same(overrides[key], parsed):
            raise ConfigError(f"--set {written[key]} and --set {pair}: two values for {key}; give it once")
        overrides[key], written[key] = parsed, pair
    return overrides


def _same(a, b) -> bool:
    """Whether two given values are the same value (3 and 3.0 are; True and 1 are not)."""
    return type(a) is type(b) and a == b or (
        isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)
        and not isinstance(b, bool) and a == b)


@dataclass
class ValueSources:
    """Where a command's training config values came from, so that its messages name each one as the user gave
    it: the flag typed (`--steps 0`), the --set written (`--set echo=false`), or the --config file and key
    (`steps=0 ... (steps from --config run.json)`). A value the user never gave (a preset's, a default) keeps
    its field name (`echo_start=500`): no message claims a flag the user did not type."""

    fields: frozenset[str]  # the config's fields: a message's other parameters are named as the command's flags
    typed: dict[str, str] = field(default_factory=dict)  # field -> "--steps" / "--set echo="
    files: dict[str, str] = field(default_factory=dict)  # field -> "--config run.json"
    problems: list[ConfigError] = field(default_factory=list)  # found before the config is built (unknown keys)

    def render(self, message: str, parameters: tuple[str, ...], flags: dict[str, str]) -> str:
        """`message`, which names `parameters` (`steps=0`), in the user's terms; `flags`: how the command spells
        each parameter (cli.flag_names), used for those that are no config field."""
        names = {p: name for p, name in flags.items() if p not in self.fields and not name.startswith("--set ")}
        names.update({p: self.typed[p] for p in parameters if p in self.typed})
        lines = []
        for line in message.split("\n"):
            text = EchoDistillError(line, parameters=parameters).in_terms_of(names)
            from_files: dict[str, list[str]] = {}
            for p in parameters:
                if p in self.files and p not in self.typed and re.search(rf"\b{re.escape(p)}=", line):
                    from_files.setdefault(self.files[p], []).append(p)
            lines.append(text + "".join(f" ({', '.join(keys)} from {where})" for where, keys in from_files.items()))
        return "\n".join(lines)


def given_config_values(args: argparse.Namespace, fields: tuple[str, ...]) -> tuple[dict, ValueSources]:
    """The training config values the user typed: each --set KEY=VALUE, and each config field the command has
    its own flag for (`--steps`: the field whose name is the flag's dest, None when not typed). A field given both
    ways with different values is refused, naming both; the same value twice is one value. Returns the values and
    their sources (ValueSources; the command adds a --config file's keys); an unknown --set key is left out and
    kept in `sources.problems` for `built_config` to list. Raises ConfigError for a conflict."""
    given = parse_overrides(getattr(args, "set", None) or [])
    written = {item.partition("=")[0].strip(): item for item in getattr(args, "set", None) or []}
    unknown = unknown_fields(given, fields, {key: f"--set {written[key]}" for key in given})
    given = {key: value for key, value in given.items() if key in fields}
    sources = ValueSources(frozenset(fields), typed={key: f"--set {key}=" for key in given},
                           problems=[unknown] if unknown else [])
    for name in fields:
        value = getattr(args, name, None)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if name in given and not _same(given[name], value):
            raise ConfigError(f"{flag} {value} and --set {written[name]}: two values for {name}; give it once, "
                              f"with {flag}")
        given[name] = value
        sources.typed[name] = flag
    return given, sources


def unknown_fields(values: dict, fields: tuple[str, ...], where: dict[str, str]) -> ConfigError | None:
    """The keys of `values` that are no config field, each named with `where` it was given and the field it may
    mean, as one ConfigError (None when every key is a field): "unknown config field(s): stepz (--set stepz=3;
    did you mean steps?); valid fields: see the options table in README.md (...)", or every field where a key
    resembles none (errors.valid_names). Callers list it with the other values' problems (`built_config`)."""
    from ..training.config import FIELDS_LISTED_IN

    unknown = [key for key in values if key not in fields]
    if not unknown:
        return None
    told = ", ".join(unknown_name(key, fields, where=where[key]) for key in unknown)
    listed = valid_names(unknown, fields, label="valid fields", listed_in=FIELDS_LISTED_IN)
    return ConfigError(f"unknown config field(s): {told}; {listed}", parameters=tuple(unknown))


def built_config(sources: "ValueSources", build: Callable):
    """build() (a TrainConfig from the known values), or one ConfigError listing the problems found before
    (`sources.problems`: unknown keys, a missing class word) together with build's own: none hides another."""
    from ..training.config import draft_configs, raise_together

    problems = list(sources.problems)
    try:
        with draft_configs() if problems else contextlib.nullcontext():  # refused anyway: no caveat about it
            config = build()
    except ConfigError as error:
        problems.append(error)
    raise_together(problems)
    return config
