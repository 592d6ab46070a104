"""The README's table of training options, written from `TrainConfig`'s own fields and help texts.

    .venv/bin/python -m echodistill.training.options_doc --write README.md

rewrites the table in place (tests/test_readme_commands.py checks that the README's table is this one), so
the documented names, defaults and meanings cannot drift from the code.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .config import TrainConfig

HEADER = "| option | default (`paper`) | meaning |\n|---|---|---|\n"


def _default(value) -> str:
    if isinstance(value, float):
        return repr(value) if len(repr(value)) <= 8 else f"{value:.3g}"  # 1/3 reads 0.333
    if isinstance(value, tuple):
        shown = str(list(value))
        return shown if len(shown) <= 80 else f"[{value[0]!r}, ...] ({len(value)} items)"  # e.g. the echo's scenes
    if value == "":
        return '""'
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bar inside a cell would end it


def options_table() -> str:
    """Every TrainConfig field as a Markdown row: `name` | `default` | help text, in the dataclass's order."""
    rows = [f"| `{f.name}` | `{_default(f.default)}` | {_cell(f.metadata['help'])} |"
            for f in dataclasses.fields(TrainConfig)]
    return HEADER + "\n".join(rows) + "\n"


def replace_table(text: str) -> str:
    """`text` (the README) with its options table replaced by `options_table()`.

    Raises ValueError when the README has no table starting with HEADER.
    """
    start = text.find(HEADER)
    if start < 0:
        raise ValueError("no options table found: the README needs a table starting with " + HEADER.splitlines()[0])
    end = start + len(HEADER)
    while end < len(text) and text.startswith("|", end):
        end = text.index("\n", end) + 1
    return text[:start] + options_table() + text[end:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="rewrite the table in this Markdown file (default: print it)")
    args = parser.parse_args()
    if args.write is None:
        print(options_table(), end="")
        return
    args.write.write_text(replace_table(args.write.read_text()))


if __name__ == "__main__":
    main()
