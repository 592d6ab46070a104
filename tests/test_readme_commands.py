"""Every command the README (and docs/) shows works as written, from a fresh shell.

The fenced ``bash`` blocks are read command by command (continuation lines joined, comments dropped).
Quick-start and command-line commands run in ``env -i`` with a minimal PATH, in the repository's folder,
as their first line's program and subcommand with ``--help`` (never the job itself). The "Install into
ComfyUI" block runs whole in a stand-in ComfyUI folder: the clone comes from this checkout and ComfyUI's
Python is a stand-in that only checks what it is asked to install. Inline code that starts with a command
must name one that exists.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
INSTALL_SECTION = "Install into ComfyUI"
FRESH_PATH = "/usr/local/bin:/usr/bin:/bin"
# `.venv/` is what scripts/bootstrap builds; a suite run from another environment lets that one stand in.
VENV = REPO / ".venv" if (REPO / ".venv" / "bin" / "python").exists() else Path(sys.prefix)
HELP_TIMEOUT_S = 300  # generous: --help loads no torch, but several start side by side on a busy machine


def fenced_blocks(path: Path) -> list[tuple[str, str, str]]:
    """(section heading, language, body) of each fenced block."""
    blocks, section, language, body = [], "", None, []
    for line in path.read_text().splitlines():
        if language is None and line.startswith("#"):
            section = line.lstrip("#").strip()
        elif line.startswith("```"):
            if language is None:
                language, body = line[3:].strip(), []
            else:
                blocks.append((section, language, "\n".join(body)))
                language = None
        elif language is not None:
            body.append(line)
    return blocks


def commands(body: str) -> list[list[str]]:
    """Each command of a shell block as words: continuations joined, comments and a trailing & dropped."""
    words_list = []
    for command in body.replace("\\\n", " ").splitlines():
        words = shlex.split(command, comments=True)
        if words and words[-1] == "&":
            words = words[:-1]
        if words:
            words_list.append(words)
    return words_list


def program_words(words: list[str]) -> list[str]:
    """The program and its subcommands: `nice -n N` dropped, up to the first option."""
    if words[:2] == ["nice", "-n"]:
        words = words[3:]
    head = [words[0]]
    for word in words[1:]:
        if word.startswith("-"):
            break
        head.append(word)
    return head


def in_fresh_shell(words: list[str]) -> list[str]:
    """`.venv/...` where the suite's environment is; the rest as written."""
    return [str(VENV / w.removeprefix(".venv/")) if w.startswith(".venv/") else w for w in words]


def run_fresh(command: str, cwd: Path, home: Path, timeout: float = HELP_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["env", "-i", f"PATH={FRESH_PATH}", f"HOME={home}", "bash", "-c", command],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )


def help_commands() -> dict[str, str]:
    """Each distinct quick-start / command-line program + subcommands, as a --help call -> where it is shown."""
    found = {}
    for document in DOCUMENTS:
        for section, language, body in fenced_blocks(document):
            if language != "bash" or section == INSTALL_SECTION:
                continue
            for words in commands(body):
                head = program_words(words)
                found.setdefault(shlex.join([*head, "--help"]), f"{document.name}, {section}")
    return found


HELP_COMMANDS = help_commands()


def test_the_readme_shows_the_commands_this_test_reads():
    shown = " ".join(HELP_COMMANDS)
    for expected in ("scripts/demo --help", "scripts/test --help", ".venv/bin/echodistill train --help",
                     ".venv/bin/echodistill bench sample --help"):
        assert expected in shown
    assert any(section == INSTALL_SECTION and language == "bash" for section, language, _ in fenced_blocks(REPO / "README.md"))


def run_help(command: str, home: Path) -> subprocess.CompletedProcess | None:
    """The --help call in a fresh shell; None where its program is a bare name (no PATH would find it)."""
    if "/" not in shlex.split(command)[0]:
        return None
    return run_fresh(shlex.join(in_fresh_shell(shlex.split(command))), REPO, home)


def problem(command: str, result: subprocess.CompletedProcess | None) -> str | None:
    """What is wrong with a shown command, given its --help run; None when it works as written."""
    if result is None:
        return f"a fresh shell has no {shlex.split(command)[0]!r} on its PATH: write its path (.venv/bin/...)"
    if result.returncode != 0:
        return f"exited {result.returncode}:\n{result.stdout[-1500:]}\n{result.stderr[-1500:]}"
    if "usage" not in result.stdout.lower():
        return f"printed no usage:\n{result.stdout[-1500:]}"
    return None


@pytest.fixture(scope="module")
def help_results(tmp_path_factory):
    """All --help calls at once, side by side (each imports the CLI's stack: seconds apiece)."""
    home = tmp_path_factory.mktemp("home")
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(HELP_COMMANDS, pool.map(lambda command: run_help(command, home), HELP_COMMANDS)))


@pytest.mark.parametrize("command", sorted(HELP_COMMANDS))
def test_each_command_runs_from_a_fresh_shell(command, help_results):
    assert problem(command, help_results[command]) is None, \
        f"{command!r} ({HELP_COMMANDS[command]}): {problem(command, help_results[command])}"


def test_a_command_that_does_not_exist_fails_the_check(tmp_path):
    """The check is not vacuous: a bare program name and a script that is not there are both refused."""
    for command in ("echodistill train --help", "scripts/no_such_script --help", ".venv/bin/no_such_tool --help"):
        assert problem(command, run_help(command, tmp_path)) is not None, command


INLINE_CODE = re.compile(r"`([^`\n]+)`")


def inline_commands(text: str) -> list[str]:
    """Inline code that reads as a command: `echodistill …`, `.venv/bin/…`, `scripts/…` with arguments."""
    spans = []
    for span in INLINE_CODE.findall(text):
        words = span.split()
        if words[:2] == ["nice", "-n"]:
            words = words[3:]
        if len(words) >= 2 and (words[0] == "echodistill" or words[0].startswith((".venv/", "scripts/"))):
            spans.append(" ".join(words))
    return spans


def test_inline_commands_name_programs_that_exist():
    spans = inline_commands((REPO / "README.md").read_text())
    assert any(s.startswith(".venv/bin/echodistill bench") for s in spans)
    for span in spans:
        program = span.split()[0]
        assert "/" in program, f"README: `{span}`: a fresh shell has no {program!r} (write .venv/bin/{program})"
        path = Path(in_fresh_shell([program])[0])
        path = path if path.is_absolute() else REPO / path
        assert path.exists(), f"README: `{span}`: {program} does not exist"


PYTHON_STANDIN = """#!/bin/sh
# ComfyUI's Python, standing in: takes only `-m pip install -r <the cloned pack's requirements.txt>`.
[ "$1 $2 $3 $4" = "-m pip install -r" ] && [ "$#" = 5 ] && [ "$(realpath "$5")" = "{expected}" ] && exit 0
echo "not what ComfyUI's Python should be asked: $*" >&2
exit 1
"""


def repository_url() -> str:
    return re.search(r'^Repository = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)


def test_install_into_comfyui_runs_as_written(tmp_path):
    (body,) = [b for s, lang, b in fenced_blocks(REPO / "README.md") if s == INSTALL_SECTION and lang == "bash"]
    assert repository_url() in body
    comfyui = tmp_path / "ComfyUI"
    (comfyui / "custom_nodes").mkdir(parents=True)
    (comfyui / "main.py").write_text("")
    python = comfyui / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    expected = comfyui / "custom_nodes" / "comfyui-echodistill" / "requirements.txt"
    python.write_text(PYTHON_STANDIN.format(expected=expected.resolve()))
    python.chmod(0o755)
    script = "set -eu\n" + body.replace(repository_url(), str(REPO))  # clone this checkout: no network
    result = run_fresh(script, tmp_path, tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (expected.parent / "__init__.py").is_file() and expected.is_file()


def test_install_into_portable_comfyui_names_one_folder():
    """The portable build's lines (Windows, not run here): clone into custom_nodes, install that folder's file."""
    (body,) = [b for s, lang, b in fenced_blocks(REPO / "README.md") if s == INSTALL_SECTION and lang == "bat"]
    clone, install = [line.split() for line in body.splitlines() if line.strip()]
    assert clone[:3] == ["git", "clone", repository_url()] and clone[3].startswith("ComfyUI\\custom_nodes\\")
    assert install[:5] == ["python_embeded\\python.exe", "-m", "pip", "install", "-r"]
    assert install[5] == clone[3] + "\\requirements.txt"


def test_fresh_shell_has_no_project_environment():
    """env -i really starts clean: no VIRTUAL_ENV, no PATH entry of this suite's interpreter."""
    result = run_fresh("echo \"$PATH|${VIRTUAL_ENV:-}\"", REPO, REPO, timeout=30)
    assert result.stdout.strip() == f"{FRESH_PATH}|"
    assert str(Path(sys.executable).parent) not in FRESH_PATH.split(os.pathsep)


def test_the_options_table_is_the_one_train_config_writes():
    from echodistill.training.options_doc import options_table, replace_table

    readme = (REPO / "README.md").read_text()
    assert options_table() in readme, (
        "the README's options table is out of date: .venv/bin/python -m echodistill.training.options_doc --write README.md")
    assert "| `offload` | `False` |" in options_table() and "| `augment_min_scale` | `0.333` |" in options_table()
    from echodistill.training.config import FIELDS_LISTED_IN

    # where an unknown-field message sends the user for every field: that section holds the table
    assert FIELDS_LISTED_IN == 'the options table in README.md ("Training a concept")'
    assert options_table() in readme.split("\n## Training a concept\n", 1)[1].split("\n## ", 1)[0]
    stale = readme.replace("| `offload` |", "| `offloaded` |")
    assert replace_table(stale) == readme  # the rewrite restores it in place, nothing else moves
    with pytest.raises(ValueError, match="no options table"):
        replace_table("# no table here\n")
