"""The project's error types: each message says what was wrong and what to do."""

from __future__ import annotations

import difflib
import re
from typing import Iterable, Mapping, Sequence


def close_name(name: str, valid: Iterable[str]) -> str | None:
    """The valid name `name` most likely misspells (difflib.get_close_matches, its default cutoff 0.6), or None."""
    close = difflib.get_close_matches(name, list(valid), n=1)
    return close[0] if close else None


def unknown_name(name: str, valid: Iterable[str], *, shown: str | None = None, where: str = "") -> str:
    """An unknown `name` as every message writes it: `shown` (default: the name itself), then in brackets `where`
    it was given and the valid name it may misspell: "stepz (--set stepz=3; did you mean steps?)"; neither: the
    name alone."""
    close = close_name(name, valid)
    notes = [note for note in (where, f"did you mean {close}?" if close else "") if note]
    shown = name if shown is None else shown
    return f"{shown} ({'; '.join(notes)})" if notes else shown


def valid_names(unknown: Iterable[str], valid: Sequence[str], *, label: str, listed_in: str) -> str:
    """How a message about `unknown` names ends: "<label>: a, b, ..." when one of them resembles no valid name
    (the user needs the choices), else "<label>: see <listed_in>": each one's did-you-mean (unknown_name) is the
    likely fix, and a list of ~50 names would bury it."""
    if all(close_name(name, valid) for name in unknown):
        return f"{label}: see {listed_in}"
    return f"{label}: {', '.join(valid)}"


class EchoDistillError(Exception):
    """Base class of every error the library raises on purpose.

    A message that tells the caller to pass an argument names it as Python does (`clip_path=...`) and lists
    it in `parameters`; a front end rewrites it in its own terms with `in_terms_of` (a flag, an input name).
    """

    def __init__(self, *args, parameters: tuple[str, ...] = ()):
        super().__init__(*args)
        self.parameters = tuple(parameters)

    def in_terms_of(self, names: Mapping[str, str]) -> str:
        """The message with each `parameter=value` / `parameter=...` / `parameter=True` / `parameter=` it names
        written as names[parameter] says: "--width" gives "--width 512", "--clip" gives "pass --clip (...)"; a
        name ending in "=" keeps the value glued ("--set resolution=" gives "--set resolution=48")."""
        text = str(self)
        for parameter in self.parameters:
            if parameter not in names:
                continue
            name = names[parameter]

            def replace(match: re.Match, name: str = name) -> str:
                following = match.string[match.end():match.end() + 1]
                if name.endswith("="):  # a --set key: the value stays, as written after it
                    return name + (match.group(1) or "")
                if match.group(1) or not following or not following.strip():
                    return name
                return f"{name} "

            text = re.sub(rf"\b{re.escape(parameter)}=(\.\.\.|True\b)?", replace, text)
        return text


class ModelLoadError(EchoDistillError):
    """A model file or folder could not be read, or does not fit its config."""


class IncompatiblePairError(EchoDistillError):
    """Teacher and student cannot share one text encoder."""


class ConceptTokenError(EchoDistillError):
    """The concept token or its initializer word is unusable."""


class ConfigError(EchoDistillError, ValueError):
    """A configuration value is unknown or out of range."""


class DataError(EchoDistillError):
    """The concept images cannot be used for training."""


class TokenizerError(EchoDistillError):
    """A tokenizer style is unknown or a tokenizer folder cannot be loaded."""


class BackboneError(EchoDistillError):
    """A discriminator backbone, IP-Adapter projection or ensemble member cannot be loaded or used."""


class OutputWriteError(EchoDistillError, OSError):
    """A file or folder the pack must write cannot be written (no space, no permission, ...)."""


class OutputBusyError(EchoDistillError):
    """Another process is writing the same output (a second training into the same run or file)."""
