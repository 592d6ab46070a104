"""The mini world's vocabulary, its scenes as structured attributes, and their captions.

A scene is one object on a background. Every attribute is a plain English word that the CLIP
BPE already knows, so the shipped text encoder reads captions through the real tokenizer:

    "a large red circle on the left, on a blue striped background"

Captions may leave attributes out ("a red circle on a plain white background"); a `Caption`
records which ones it states, so an oracle can score an image against exactly what was asked.
A fifth of the training captions wrap the subject in one of the trainer's prompt templates
("a photo of a red circle"), so template words the personalization trainer uses are words the
shipped teacher has seen, as the real SD 2.1 has seen "a photo of".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from ..training.templates import PROMPT_TEMPLATES

COLORS: tuple[str, ...] = ("red", "yellow", "green", "blue", "white", "black")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "ring")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
PATTERNS: tuple[str, ...] = ("plain", "striped", "checkered", "gradient")

# Every attribute an oracle can read back, with its choices. "shape" and "color" describe the
# object; for a concept (a subject the grammar cannot describe) they are not stated.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "size": SIZES,
    "position": POSITIONS,
    "bg_color": COLORS,
    "bg_pattern": PATTERNS,
}
CONTEXT_ATTRIBUTES: tuple[str, ...] = ("size", "position", "bg_color", "bg_pattern")

POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

# Templates naming a size would contradict the scene unless the size matches, so they state it.
_SIZE_IN_TEMPLATE = {"small": "small", "large": "large"}
OMIT_PROBABILITY = 0.15  # per optional attribute in a training caption
TEMPLATE_PROBABILITY = 0.2  # share of training captions written as "a photo of a red circle"


@dataclass(frozen=True)
class Scene:
    """What a picture shows, as words. `subject` is a grammar shape or a concept's name."""

    subject: str
    color: str | None  # None for a concept: it brings its own colours
    size: str
    position: str
    bg_color: str
    bg_pattern: str

    def __post_init__(self) -> None:
        for name in ("size", "position", "bg_color", "bg_pattern"):
            value = getattr(self, name)
            if value not in ATTRIBUTES[name]:
                raise ValueError(f"Scene.{name}={value!r} is not one of {ATTRIBUTES[name]}")
        if self.is_concept != (self.color is None):
            raise ValueError(
                f"Scene(subject={self.subject!r}, color={self.color!r}): a grammar shape needs a colour "
                f"from {COLORS}, a concept takes none"
            )
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"Scene.color={self.color!r} is not one of {COLORS}")

    @property
    def is_concept(self) -> bool:
        return self.subject not in SHAPES

    def attributes(self) -> dict[str, str]:
        """Every readable attribute of the scene (object attributes only for grammar shapes)."""
        values = {"size": self.size, "position": self.position, "bg_color": self.bg_color, "bg_pattern": self.bg_pattern}
        if not self.is_concept:
            values.update(shape=self.subject, color=self.color)
        return values


@dataclass(frozen=True)
class Caption:
    """A prompt and the attributes it states (attribute name -> word)."""

    text: str
    stated: Mapping[str, str]


def sample_scene(rng: np.random.Generator, subject: str | None = None) -> Scene:
    """A uniformly random scene; the object's colour always differs from the background's."""
    bg_color = str(rng.choice(COLORS))
    if subject is None:
        subject = str(rng.choice(SHAPES))
    color = None
    if subject in SHAPES:
        color = str(rng.choice([c for c in COLORS if c != bg_color]))
    return Scene(
        subject=subject,
        color=color,
        size=str(rng.choice(SIZES)),
        position=str(rng.choice(POSITIONS)),
        bg_color=bg_color,
        bg_pattern=str(rng.choice(PATTERNS)),
    )


def background_phrase(bg_color: str, bg_pattern: str) -> str:
    if bg_pattern == "plain":
        return f"on a plain {bg_color} background"
    return f"on a {bg_color} {bg_pattern} background"


_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeiou])")


def with_articles(text: str) -> str:
    """'a orange star' -> 'an orange star': the article agrees with the word after it (captions put colours
    that start with a vowel after "a")."""
    return _A_BEFORE_VOWEL.sub(r"\1n ", text)


def describe(scene: Scene, stated: frozenset[str] | None = None, noun: str | None = None) -> Caption:
    """The grammar's sentence for `scene`, stating only the attributes in `stated` (all if None).

    `noun` replaces the subject's words: concept prompts pass "{token} ring" here.
    Background colour and pattern are stated together or not at all.
    """
    attrs = scene.attributes()
    stated = frozenset(attrs) if stated is None else frozenset(stated) & frozenset(attrs)
    if ("bg_color" in stated) != ("bg_pattern" in stated):
        raise ValueError("bg_color and bg_pattern are stated together or not at all")
    words = ["a"]
    if "size" in stated:
        words.append(scene.size)
    if noun is None:
        if "color" in stated:
            words.append(scene.color)
        words.append(scene.subject)
        stated |= {"shape"}
    else:
        words.append(noun)
    text = " ".join(words)
    if "position" in stated:
        text += " " + POSITION_PHRASES[scene.position]
    if "bg_color" in stated:
        text += (", " if "position" in stated else " ") + background_phrase(scene.bg_color, scene.bg_pattern)
    return Caption(with_articles(text), {name: attrs[name] for name in sorted(stated)})


def templated(scene: Scene, template: str) -> tuple[Scene, Caption]:
    """"a photo of a red circle": a trainer template around colour + shape, nothing else stated.

    A template that names a size ("a photo of the small {}") sets the scene's size to match.
    """
    size = next((s for word, s in _SIZE_IN_TEMPLATE.items() if word in template.split()), None)
    if size is not None:
        scene = replace(scene, size=size)
    stated = {"shape": scene.subject, "color": scene.color}
    if size is not None:
        stated["size"] = size
    return scene, Caption(with_articles(template.format(f"{scene.color} {scene.subject}")), stated)


def training_caption(scene: Scene, rng: np.random.Generator) -> tuple[Scene, Caption]:
    """A caption drawn the way the teacher is trained: some attributes left out, some templated.

    Returns the scene too, since a template naming a size changes it.
    """
    if rng.random() < TEMPLATE_PROBABILITY:
        return templated(scene, str(rng.choice(PROMPT_TEMPLATES)))
    stated = {"shape", "color", "size", "position", "bg_color", "bg_pattern"}
    for name in ("color", "size", "position"):
        if rng.random() < OMIT_PROBABILITY:
            stated.discard(name)
    if rng.random() < OMIT_PROBABILITY:
        stated -= {"bg_color", "bg_pattern"}
    return scene, describe(scene, frozenset(stated))
