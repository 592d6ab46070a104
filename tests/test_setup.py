"""What the package and its set-up promise: metadata, the registry icon, the set-up scripts' interface."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = (REPO / "pyproject.toml").read_text()


def _requirements(text: str) -> list[str]:
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


def test_the_registry_icon_exists_and_is_a_400px_png():
    url = re.search(r'^Icon = "(.+)"$', PYPROJECT, re.M).group(1)
    path = REPO / url.split("/main/", 1)[1]
    assert path == REPO / "docs" / "icon.png"
    with Image.open(path) as icon:
        assert (icon.format, icon.size) == ("PNG", (400, 400))


def test_requirements_txt_and_pyproject_dependencies_agree():
    block = re.search(r"^dependencies = \[(.*?)^\]", PYPROJECT, re.M | re.S).group(1)
    from_pyproject = re.findall(r'"([^"]+)"', block)
    assert from_pyproject == _requirements((REPO / "requirements.txt").read_text())
    assert not any(name.startswith(("torch", "comfyui-frontend")) for name in from_pyproject)  # ComfyUI owns them


def test_license_is_an_spdx_expression_with_its_file():
    assert re.search(r'^license = "MIT"$', PYPROJECT, re.M)
    assert re.search(r'^license-files = \["LICENSE"\]$', PYPROJECT, re.M)
    assert (REPO / "LICENSE").read_text().startswith("MIT License")


def test_bootstrap_names_its_two_layers_and_refuses_anything_else():
    shown = subprocess.run([REPO / "scripts" / "bootstrap", "--help"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and re.search(r"^\s+demo\s", shown.stdout, re.M) and re.search(r"^\s+test\s", shown.stdout, re.M)
    for args in ([], ["everything"]):
        refused = subprocess.run([REPO / "scripts" / "bootstrap", *args], capture_output=True, text=True, timeout=30)
        assert refused.returncode == 2 and refused.stderr.startswith("usage: scripts/bootstrap demo|test")
