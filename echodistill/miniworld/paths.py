"""Where the shipped mini world lies in the package: paths only, free of torch, so that command-line checks
(`bench ... --models`, `--help`) answer before torch loads."""

from __future__ import annotations

from pathlib import Path

ASSET_ROOT = Path(__file__).resolve().parent.parent / "assets" / "miniworld"
MODEL_ROOT = ASSET_ROOT / "models"
ORACLE_ROOT = ASSET_ROOT / "oracle"
TEACHER_DIR = MODEL_ROOT / "teacher"
STUDENT_DIR = MODEL_ROOT / "student"
# Concept bundles trained on the shipped pair (`echodistill demo --concept NAME`), so a graph that
# samples a saved concept runs on a fresh install.
SHIPPED_CONCEPT_DIR = ASSET_ROOT / "concepts"
