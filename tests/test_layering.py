"""The library's rooms import one way only, with no cycle: the contracts in pyproject.toml hold.

import-linter checks them ([tool.importlinter]; docs/architecture.md draws them): the layers from
the command line down to the small utilities, the benchmarks kept out of the product, the nodes
apart from the command line, no ComfyUI import in the library, and no import cycle between the
modules of any package.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_imports_keep_the_layering_contracts():
    lint_imports = Path(sys.executable).with_name("lint-imports")  # installed with the test requirements
    # A process of its own, run from the repository: it reads pyproject.toml there and finds `nodes`
    # as this repository's package, never ComfyUI's module of the same name that other tests import.
    result = subprocess.run([str(lint_imports), "--no-cache", "--no-logo"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "One way down" in report and " 0 broken" in report, report
