"""Deterministic 64×64 renderer of mini-world scenes.

A scene (grammar.Scene: words) becomes a picture through a `Layout` (numbers: the exact
centre, radius, rotation and background phase), drawn from a numpy Generator, so one seed
gives one picture on every machine. Grammar shapes are painted here; the held-out concepts
(concepts.py) and the procedural subjects (procedural.py) paint themselves. Both draw with the primitives of drawing.py.
"""

from __future__ import annotations

import numpy as np

from .drawing import ANGLE_JITTER, RESOLUTION, Layout, Painter, draw, sample_layout, shape_painter
from .grammar import Scene
from .procedural import lookup_subject

__all__ = ["RESOLUTION", "painter_for", "render", "render_layout"]


def _concept(name: str):
    return lookup_subject(name)


def painter_for(scene: Scene) -> Painter:
    if not scene.is_concept:
        return shape_painter(scene.subject, scene.color)
    return _concept(scene.subject).paint


def render_layout(scene: Scene, layout: Layout) -> np.ndarray:
    """(64, 64, 3) uint8 picture of `scene` placed by `layout`."""
    return draw(scene, layout, painter_for(scene))


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """(64, 64, 3) uint8 picture of `scene`; the layout is drawn from `rng`."""
    angle = _concept(scene.subject).angle_jitter if scene.is_concept else ANGLE_JITTER
    return render_layout(scene, sample_layout(scene, rng, angle))
