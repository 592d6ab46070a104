"""Held-out subjects for personalization: objects the grammar has no words for.

Each concept is multi-part or textured (a ring with a cross inside, a checkered two-tone
diamond, ...), so no caption of the grammar can ask the base models for it. Its class word is
the grammar shape it resembles ("ring", "diamond", ...): like DreamBench's "a <v*> dog", the
class is something the base models already draw and the instance is what training must add, and
the concept token can be initialised from a word the shipped text encoder has learnt.

The base models never see these subjects: the training data holds grammar shapes only. The
oracles (oracle.py) do see them, in random contexts, so they can tell them apart.

    concept = CONCEPTS["crossed_ring"]
    refs = reference_images(concept)                # (5, 64, 64, 3) uint8 on plain backgrounds
    for prompt in evaluation_prompts(concept):      # 12 contexts, "{token}" placeholder
        prompt.text.format(token="<v*>"), prompt.stated
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from .grammar import COLORS, PATTERNS, POSITIONS, SIZES, Caption, Scene, describe
from .drawing import (
    PALETTE, Layer, Layout, Painter, POSITION_CENTRES, annulus, box, disk, draw, rhombus, star, triangle,
)

ORANGE = (0.98, 0.58, 0.12)  # outside the grammar's palette: no plain shape has it
PURPLE = (0.52, 0.22, 0.70)
TOKEN_PLACEHOLDER = "{token}"


@dataclass(frozen=True)
class Concept:
    """A subject the grammar cannot describe, with how to draw it and where to show it."""

    name: str
    class_word: str  # a grammar shape the base models know
    description: str
    paint: Painter = field(repr=False)  # (u, v) local frame -> layers, bottom first
    clashes: tuple[str, ...]  # background colours it would vanish into
    angle_jitter: float = np.deg2rad(20.0)  # radians, either way
    color_word: str | None = None  # the word for its body colour, where a caption may name it
    pattern_word: str | None = None  # "striped" / "checkered" / "dotted", where a caption may name it
    decorations: tuple[tuple[str, str], ...] = ()  # (decoration, colour word) a caption may list after "with"


def _crossed_ring(u, v) -> list[Layer]:
    return [(annulus(u, v, 0.62), PALETTE["red"]), (box(u, v, 0.16, 0.62) | box(u, v, 0.62, 0.16), PALETTE["blue"])]


def _checker_diamond(u, v) -> list[Layer]:
    # Cells run along the diamond's own edges: the checker is rotated with it.
    cells = (np.floor((u / 0.7 + v) * 2.2) + np.floor((v - u / 0.7) * 2.2)) % 2 == 0
    shape = rhombus(u, v)
    return [(shape, ORANGE), (shape & cells, PURPLE)]


def _smiley(u, v) -> list[Layer]:
    eyes = disk(u, v, 0.15, -0.35, -0.28) | disk(u, v, 0.15, 0.35, -0.28)
    smile = annulus(u, v - 0.05, 0.45, 0.62) & (v > 0.22)  # the lower arc of a circle
    return [(disk(u, v), PALETTE["yellow"]), (eyes | smile, PALETTE["black"])]


def _striped_star(u, v) -> list[Layer]:
    shape = star(u, v)
    stripes = np.floor((v + 1.0) / 0.3) % 2 == 0  # horizontal bands across the star
    return [(shape, PALETTE["red"]), (shape & stripes, PALETTE["white"])]


def _window(u, v) -> list[Layer]:
    panes = (
        box(u, v, 0.32, 0.32, -0.42, -0.42) | box(u, v, 0.32, 0.32, 0.42, -0.42)
        | box(u, v, 0.32, 0.32, -0.42, 0.42) | box(u, v, 0.32, 0.32, 0.42, 0.42)
    )
    return [(box(u, v, 0.88, 0.88), PALETTE["white"]), (panes, (0.35, 0.75, 0.95))]


def _eye_triangle(u, v) -> list[Layer]:
    return [
        (triangle(u, v), PALETTE["green"]),
        (disk(u, v, 0.33, 0.0, 0.25), PALETTE["white"]),
        (disk(u, v, 0.15, 0.0, 0.25), PALETTE["black"]),
    ]


CONCEPTS: dict[str, Concept] = {
    c.name: c
    for c in (
        Concept("crossed_ring", "ring", "a red ring with a blue cross inside", _crossed_ring, ("red", "blue")),
        Concept("checker_diamond", "diamond", "an orange and purple checkered diamond", _checker_diamond, ()),
        Concept("smiley", "circle", "a yellow smiling face", _smiley, ("yellow",)),
        Concept("striped_star", "star", "a red star with white stripes", _striped_star, ("red", "white")),
        Concept("window", "square", "a white square with four light blue panes", _window, ("white",),
                angle_jitter=np.deg2rad(10.0)),
        Concept("eye_triangle", "triangle", "a green triangle with a white eye", _eye_triangle, ("green",)),
    )
}

REFERENCES_PER_CONCEPT = 5
# (position, radius in pixels): varied poses and places, between the grammar's small and large.
REFERENCE_POSES: tuple[tuple[str, float], ...] = (
    ("center", 15.0), ("left", 11.0), ("right", 13.0), ("top", 10.0), ("bottom", 12.0),
)


@dataclass(frozen=True)
class ConceptPrompt:
    """An evaluation prompt with "{token}" where the concept token goes, and what it states."""

    text: str
    stated: dict[str, str]
    scene: Scene  # the scene it asks for, to render a ground truth


# DreamBench-style: one list of contexts for every concept (size, position, bg colour, pattern).
EVALUATION_CONTEXTS: tuple[tuple[str, str, str, str], ...] = (
    ("large", "left", "blue", "striped"),
    ("small", "right", "green", "plain"),
    ("large", "top", "white", "checkered"),
    ("small", "bottom", "red", "gradient"),
    ("large", "center", "black", "plain"),
    ("small", "center", "yellow", "striped"),
    ("small", "left", "white", "gradient"),
    ("large", "right", "blue", "checkered"),
    ("small", "top", "black", "striped"),
    ("large", "bottom", "green", "checkered"),
    ("large", "center", "red", "gradient"),
    ("small", "right", "yellow", "plain"),
)


def echo_prompts() -> tuple[str, ...]:
    """The echo's new contexts on the mini world (TrainConfig.echo_prompts): every scene of the grammar whose size,
    position and background pattern no evaluation context has (174 of 240), with "{}" for "<token> <class word>",
    e.g. "a small {} on the left, on a plain red background". The trainer's default contexts ("on a sandy
    beach", ...) are words the world's text encoder has no scene for: the student's pictures of them would
    teach the teacher nothing of the world, and the evaluation's own scenes stay out of training.
    """
    shown = {(size, position, pattern) for size, position, _, pattern in EVALUATION_CONTEXTS}
    return tuple(describe(Scene("echo", None, size, position, color, pattern), noun="{}").text
                 for size in SIZES for position in POSITIONS for pattern in PATTERNS for color in COLORS
                 if (size, position, pattern) not in shown)


def evaluation_prompts(concept: Concept) -> list[ConceptPrompt]:
    """One prompt per context, e.g. "a large {token} ring on the left, on a blue striped background".

    A context whose background the concept would vanish into (a yellow smiley on yellow) moves
    to the next palette colour that shows it and gives a context not already in the list.
    """
    noun = f"{TOKEN_PLACEHOLDER} {concept.class_word}"
    prompts, seen = [], set()
    for size, position, bg_color, bg_pattern in EVALUATION_CONTEXTS:
        start = COLORS.index(bg_color)
        candidates = [COLORS[(start + step) % len(COLORS)] for step in range(len(COLORS))]
        color = next(c for c in candidates if c not in concept.clashes and (size, position, c, bg_pattern) not in seen)
        seen.add((size, position, color, bg_pattern))
        scene = Scene(concept.name, None, size, position, color, bg_pattern)
        caption: Caption = describe(scene, noun=noun)
        prompts.append(ConceptPrompt(caption.text, dict(caption.stated), scene))
    return prompts


def reference_layouts(concept: Concept) -> list[tuple[Scene, Layout]]:
    """Where the references are drawn: varied positions, sizes and angles, plain backgrounds."""
    # The named concepts keep the layouts they always had; any other subject's come from its name.
    key = sorted(CONCEPTS).index(concept.name) + 1000 if concept.name in CONCEPTS else zlib.crc32(concept.name.encode())
    rng = np.random.default_rng(key)
    backgrounds = [c for c in COLORS if c not in concept.clashes]
    pairs = []
    for index, (position, radius) in enumerate(REFERENCE_POSES[:REFERENCES_PER_CONCEPT]):
        bg_color = backgrounds[index % len(backgrounds)]
        size = "large" if radius >= 12.0 else "small"  # nearest grammar size; references sit between
        scene = Scene(concept.name, None, size, position, bg_color, "plain")
        cx, cy = POSITION_CENTRES[position]
        angle = float(rng.uniform(-concept.angle_jitter, concept.angle_jitter))
        pairs.append((scene, Layout(cx, cy, radius, angle, (0.0, 0.0), True)))
    return pairs


def reference_images(concept: Concept) -> np.ndarray:
    """(5, 64, 64, 3) uint8 reference renders of the concept on plain backgrounds."""
    return np.stack([draw(scene, layout, concept.paint) for scene, layout in reference_layouts(concept)])


# What a reference's caption states (benchmark reports record it: captions of another form are other runs).
REFERENCE_CAPTION_STATES = frozenset({"bg_color", "bg_pattern"})


def reference_captions(concept: Concept) -> list[str]:
    """One caption per reference in the world's grammar, "{}" standing for "<token> <class word>".

    The background is stated ("a {} on a plain yellow background"): it stays true under the recipe's
    augmentations (mirror images, zoomed-in crops); the position does not (a mirror image swaps left and
    right). Stating the size as well ("a large {} on ...") was measured with `bench world-probe` (six
    subjects x two seeds) on the second world's teacher: +0.073 ± 0.018 paired at step 4,500, alike at
    step 7,700, and on the final teacher −0.030 ± 0.029 at 0.036 less prompt fidelity (0.524 at 0.910
    against 0.553 at 0.946), so the finished world's captions leave it out (docs/quality.md).
    """
    return [describe(scene, REFERENCE_CAPTION_STATES, noun="{}").text for scene, _ in reference_layouts(concept)]
