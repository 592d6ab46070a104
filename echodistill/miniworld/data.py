"""Datasets of rendered scenes: picture i depends only on (seed, i), whatever the worker split."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from .concepts import Concept
from .grammar import COLORS, Caption, Scene, sample_scene, training_caption
from .procedural import BASE_SEEDS, ORACLE_SEEDS, procedural_caption, procedural_subject
from .render import render

# Share of pictures whose object is a procedural subject (procedural.py) rather than a plain shape.
PROCEDURAL_SHARE = 0.5


@dataclass
class RenderedSet:
    images: np.ndarray  # (N, 64, 64, 3) uint8
    scenes: list[Scene]
    captions: list[Caption]


def _item(seed: int, index: int, oracle: bool) -> tuple[np.ndarray, Scene, Caption]:
    """Picture `index`: a plain shape or a procedural subject, from the base or the oracle seed range.

    The six named concepts never appear: the base models must not see them, and the subject
    oracle scores them as subjects it never saw.
    """
    rng = np.random.default_rng([seed, index])
    if rng.random() >= PROCEDURAL_SHARE:
        scene, caption = training_caption(sample_scene(rng), rng)
        return render(scene, rng), scene, caption
    seeds = ORACLE_SEEDS if oracle else BASE_SEEDS
    subject = procedural_subject(int(rng.integers(seeds.start, seeds.stop)))
    scene, caption = procedural_caption(subject_scene(subject, rng), subject, rng)
    return render(scene, rng), scene, caption


def subject_scene(subject: Concept, rng: np.random.Generator) -> Scene:
    """A random scene of a self-painting subject, on a background it does not vanish into."""
    scene = sample_scene(rng, subject.name)
    if scene.bg_color in subject.clashes:  # a body on its own colour would vanish
        others = [c for c in COLORS if c not in subject.clashes]
        scene = Scene(scene.subject, None, scene.size, scene.position, others[int(rng.integers(len(others)))],
                      scene.bg_pattern)
    return scene


def _chunk(args: tuple[int, int, int, bool]) -> list[tuple[np.ndarray, Scene, Caption]]:
    seed, start, stop, oracle = args
    return [_item(seed, i, oracle) for i in range(start, stop)]


def render_set(count: int, seed: int, *, oracle: bool = False, workers: int = 1) -> RenderedSet:
    """`count` random scenes with training captions, half of them procedural subjects.

    `oracle` draws the procedural subjects from the oracle's seed range instead of the base models'.
    """
    chunk = 512
    jobs = [(seed, start, min(start + chunk, count), oracle) for start in range(0, count, chunk)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_chunk, jobs))
    else:
        parts = [_chunk(job) for job in jobs]
    items = [item for part in parts for item in part]
    return RenderedSet(
        images=np.stack([item[0] for item in items]),
        scenes=[item[1] for item in items],
        captions=[item[2] for item in items],
    )
