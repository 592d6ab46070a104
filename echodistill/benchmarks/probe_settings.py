"""The world probe's settings and bar, without torch: `bench world-probe --help` reads its defaults here."""

from __future__ import annotations

from dataclasses import dataclass

from ..miniworld.recipe import AUGMENT_MIN_SCALE

# The world's bar (a fair world lets the paper's adapter learn its subjects).
SUBJECT_BAR, PROMPT_BAR = 0.50, 0.80


@dataclass(frozen=True)
class ProbeSettings:
    steps: int = 400
    batch: int = 2  # the paper's
    # K/V deltas; the paper's 1e-5 is for SD's 320–1280-wide layers and 1000+ steps. On the second world's
    # teacher (docs/quality.md, token row at 1e-2) crossed_ring scored 0.136 at 1e-3, 0.242 at 1e-4, 0.166 at 3e-5.
    lr: float = 1e-4
    token_lr: float = 1e-2
    min_scale: float = AUGMENT_MIN_SCALE
    seed: int = 0
    images_per_prompt: int = 1
