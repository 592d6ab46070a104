"""The world probe's settings and bar, without torch: `bench world-probe --help` reads its defaults here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
# One seed moves a single subject by 0.1–0.3 between neighbouring settings (docs/quality.md): two per subject
# halve the variance of every comparison, as the quality table's 6 subjects x 2 seeds do.
DEFAULT_SEEDS = 2
# Custom Diffusion's class-prior regularization (Kumari et al. 2023, §3.1 "Regularization dataset": 200 images
# of the class, trained on beside the subject's): here the untrained teacher's own pictures of the class word.
PRIOR_IMAGES = 200


@dataclass(frozen=True)
class ProbeSettings:
    steps: int = 400
    batch: int = 2  # the paper's
    lr: float = DEFAULT_LR["adapter"]  # of what `trainable` names
    token_lr: float = 1e-2
    trainable: str = "adapter"  # one of TRAINABLE
    min_scale: float = AUGMENT_MIN_SCALE
    seed: int = 0  # the first seed; the probe runs seed, seed + 1, ..., seed + seeds - 1
    seeds: int = DEFAULT_SEEDS
    images_per_prompt: int = 1
    prior_weight: float = 0.0  # the class-prior term's weight: 0 is the plain masked denoising loss (the bar's)
    prior_images: int = PRIOR_IMAGES

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable={self.trainable!r}: give one of {', '.join(TRAINABLE)}")
        if self.seeds < 1 or self.prior_images < 1:
            raise ValueError(f"seeds={self.seeds}, prior_images={self.prior_images}: give 1 or more")

    def diagnostics(self) -> list[str]:
        """Why a run with these settings is not the bar (empty: it is): the bar trains the paper's teacher
        adapter, K/V deltas + token row, with the plain masked denoising loss."""
        reasons = []
        if self.trainable == "unet":
            reasons.append("every UNet weight + the token row trained")
        elif self.lr == 0:
            reasons.append("the token row alone (K/V deltas frozen at --lr 0)")
        if self.token_lr == 0:
            reasons.append("the token row frozen (--token-lr 0)")
        if self.prior_weight > 0:
            reasons.append(f"a class-prior term (weight {self.prior_weight:g}, {self.prior_images} class pictures)")
        return reasons


def check_baseline(concepts: Sequence, settings: ProbeSettings, baseline: dict) -> None:
    """Raise ValueError unless `baseline` (a world_probe.json's content) probed one of `concepts` with one of the
    seeds `settings` runs: otherwise there is nothing to pair."""
    planned = {(c.name, seed) for c in concepts for seed in range(settings.seed, settings.seed + settings.seeds)}
    if not planned & {(r.get("concept"), r.get("seed", 0)) for r in baseline["records"]}:
        raise ValueError("the baseline probed none of these subjects with these seeds: give a report of the same "
                         "subjects and --seed")
