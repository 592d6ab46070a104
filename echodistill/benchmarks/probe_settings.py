"""The world probe's settings and bar, without torch: `bench world-probe --help` reads its defaults here."""

from __future__ import annotations

from dataclasses import dataclass

from ..miniworld.recipe import AUGMENT_MIN_SCALE

# The world's bar (a fair world lets the paper's adapter learn its subjects).
SUBJECT_BAR, PROMPT_BAR = 0.50, 0.80


# What trains besides the token row: "adapter", the paper's teacher adapter (cross-attention K/V deltas: the
# bar); "unet", every UNet weight (DreamBooth-style): not the bar, a diagnostic of whether a shortfall is the
# adapter's or the teacher's (docs/quality.md, "Is it the adapter or the teacher?").
TRAINABLE = ("adapter", "unet")
# K/V deltas: the paper's 1e-5 is for SD's 320–1280-wide layers and 1000+ steps. On the second world's teacher
# (docs/quality.md, token row at 1e-2) crossed_ring scored 0.136 at 1e-3, 0.242 at 1e-4, 0.166 at 3e-5.
# Whole UNet: 1e-5 (smiley 0.611, crossed_ring 0.420) beat 1e-4 (0.463, 0.360) on the same teacher.
DEFAULT_LR = {"adapter": 1e-4, "unet": 1e-5}


@dataclass(frozen=True)
class ProbeSettings:
    steps: int = 400
    batch: int = 2  # the paper's
    lr: float = DEFAULT_LR["adapter"]  # of what `trainable` names
    token_lr: float = 1e-2
    trainable: str = "adapter"  # one of TRAINABLE

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable={self.trainable!r}: give one of {', '.join(TRAINABLE)}")
    min_scale: float = AUGMENT_MIN_SCALE
    seed: int = 0
    images_per_prompt: int = 1
