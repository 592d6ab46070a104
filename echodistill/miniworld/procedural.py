"""A procedural family of subjects: thousands of multi-part, multi-colour, textured objects, one per seed.

They play two roles that real-world photos play for SD and DINO:
  * the base models' training data mixes them in, captioned by their class word (the grammar
    shape of their outline), often with their body colour and either a pattern word ("a red
    striped ring") or their decorations and those colours ("an orange ring with a blue cross"):
    the class word then covers a whole family of instances, as "dog" does in SD, and a
    personalization method has to pick ONE instance out of it. As SD's captions can name a
    subject's colours and parts but never its identity, the text encoder learns directions for
    every colour and part, and a concept token can combine them; the exact geometry (stripe
    period and angle, where the dots lie) no caption states;
  * the subject oracle learns to tell them apart (contrastive instance discrimination over
    thousands of seeds), so it scores subjects it never saw — the six named concepts and fresh seeds — the
    way DINO scores DreamBench's dog.

Seeds are split into disjoint ranges (`SeedRange`): base-model data, oracle training, and
validation; the named concepts are drawn by hand (concepts.py) and are never produced here.

    subject = procedural_subject(123)         # a Concept: class word, painter, colour / pattern words
    subject.class_word, subject.color_word, subject.pattern_word, subject.decorations
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .concepts import Concept
from .grammar import COLORS, OMIT_PROBABILITY, SHAPES, TEMPLATE_PROBABILITY, Caption, Scene, describe, with_articles
from ..training.templates import PROMPT_TEMPLATES
from .drawing import PALETTE, SHAPE_MASKS, Layer, annulus, box, disk

PREFIX = "procedural_"

# Colours outside the grammar's palette: plain grammar shapes never take them; a procedural subject may, and its
# captions name them as they name palette colours.
EXTRA_COLORS: dict[str, tuple[float, float, float]] = {
    "orange": (0.98, 0.58, 0.12),
    "purple": (0.52, 0.22, 0.70),
    "teal": (0.10, 0.62, 0.62),
    "pink": (0.95, 0.55, 0.72),
    "brown": (0.50, 0.30, 0.14),
    "light blue": (0.35, 0.75, 0.95),
    "grey": (0.55, 0.55, 0.55),
}
ALL_COLORS: dict[str, tuple[float, float, float]] = {**PALETTE, **EXTRA_COLORS}

# Decorations painted over the body, inside its outline; the first three also have an adjective.
PATTERN_WORDS: dict[str, str] = {"stripes": "striped", "checker": "checkered", "dots": "dotted"}
DECORATIONS: tuple[str, ...] = ("stripes", "checker", "dots", "cross", "core", "half", "band")
# How a caption names a decoration after "with": plural nouns take no article ("with blue stripes").
DECORATION_NOUNS: dict[str, str] = {"stripes": "stripes", "checker": "checks", "dots": "dots", "cross": "a cross",
                                    "core": "a core", "half": "a half", "band": "a band"}
DECORATIONS_STATED = 0.5  # share of captions that list the decorations and their colours
PATTERN_STATED = 0.5  # of the other captions of a patterned subject, the share that say "striped" etc.
NAMED_MAIN_COLOR = 0.6  # share of subjects whose body is a palette colour (the rest: EXTRA_COLORS)
SECOND_DECORATION = 0.35


@dataclass(frozen=True)
class SeedRange:
    """Disjoint seed ranges, so no oracle is scored on a subject it was trained on."""

    start: int
    stop: int

    def seeds(self) -> range:
        return range(self.start, self.stop)


BASE_SEEDS = SeedRange(0, 1_000_000)  # base-model training data: a fresh subject per picture
ORACLE_SEEDS = SeedRange(2_000_000, 2_100_000)  # the subject encoder's training subjects
VALIDATION_SEEDS = SeedRange(3_000_000, 3_100_000)  # never trained on: oracle validation, fresh demo subjects
# What each range trained: a subject from one of them is no fresh test of personalization.
TRAINED_SEEDS: dict[str, SeedRange] = {"the base models and the image-prompt adapter": BASE_SEEDS,
                                       "the subject oracle": ORACLE_SEEDS}


MAX_SEED = 2**63 - 1  # numpy's seeds take any size; a name must still fit a file name (255 bytes)


def is_procedural(name: str) -> bool:
    """Whether `name` is "procedural_<seed>", the seed written in ASCII digits, 0 to MAX_SEED."""
    seed = name[len(PREFIX):]
    return (name.startswith(PREFIX) and seed.isascii() and seed.isdigit() and len(seed.lstrip("0")) <= 19
            and _seed_of(name) <= MAX_SEED)  # the length first: int() refuses strings of 4,300+ digits


def _seed_of(name: str) -> int:
    """The seed of "procedural_<digits>" (leading zeros dropped before int(), which refuses 4,300+ digits)."""
    return int(name[len(PREFIX):].lstrip("0") or "0")


def trained_on(seed: int) -> tuple[str, SeedRange] | None:
    """(what trained on it, its seed range) when procedural subject `seed` was in a training set; None: fresh."""
    return next(((what, seeds) for what, seeds in TRAINED_SEEDS.items() if seeds.start <= seed < seeds.stop), None)


def procedural_name(seed: int) -> str:
    return f"{PREFIX}{seed}"


def _decoration(kind: str, rng: np.random.Generator):
    """A mask function (u, v) -> bool for one decoration, its parameters drawn from `rng`."""
    angle = float(rng.uniform(0, np.pi))
    cos, sin = np.cos(angle), np.sin(angle)
    if kind == "stripes":
        period = float(rng.uniform(0.3, 0.55))
        phase = float(rng.uniform(0, period))
        return lambda u, v: ((cos * u + sin * v + phase) % period) < period / 2
    if kind == "checker":
        cell = float(rng.uniform(0.3, 0.5))
        return lambda u, v: (np.floor((cos * u + sin * v) / cell) + np.floor((-sin * u + cos * v) / cell)) % 2 == 0
    if kind == "dots":
        count = int(rng.integers(1, 5))
        radius = float(rng.uniform(0.13, 0.24))
        centres = rng.uniform(-0.5, 0.5, size=(count, 2))
        return lambda u, v: np.any([disk(u, v, radius, cu, cv) for cu, cv in centres], axis=0)
    if kind == "cross":
        half = float(rng.uniform(0.1, 0.2))
        tilt = float(rng.choice([0.0, np.pi / 4]))
        c, s = np.cos(tilt), np.sin(tilt)
        return lambda u, v: box(c * u + s * v, -s * u + c * v, half, 1.0) | box(c * u + s * v, -s * u + c * v, 1.0, half)
    if kind == "core":
        radius = float(rng.uniform(0.22, 0.45))
        offset = rng.uniform(-0.2, 0.2, size=2)
        return lambda u, v: disk(u, v, radius, float(offset[0]), float(offset[1]))
    if kind == "half":
        return lambda u, v: (cos * u + sin * v) > 0
    if kind == "band":
        inner = float(rng.uniform(0.3, 0.55))
        outer = inner + float(rng.uniform(0.15, 0.25))
        return lambda u, v: annulus(u, v, inner, outer)
    raise ValueError(f"unknown decoration {kind!r}")


def _pick_color(rng: np.random.Generator, avoid: set[str]) -> str:
    names = [name for name in ALL_COLORS if name not in avoid]
    return str(names[int(rng.integers(len(names)))])


@lru_cache(maxsize=4096)
def procedural_subject(seed: int, outline: str | None = None) -> Concept:
    """The subject of `seed`: an outline from the grammar's shapes, a body colour and 1–2 decorations.

    Deterministic in `seed` (numpy's PCG64 on every machine). `outline`: the same colours and decorations on
    another of the grammar's shapes (the subject's outline twin, "procedural_<seed>_as_<shape>"), a different
    subject that shares its palette: the subject oracle learns from such pairs that the outline matters.
    Raises ValueError for a negative seed or an outline that is not one of SHAPES.
    """
    if seed < 0:
        raise ValueError(f"procedural subject seeds are non-negative integers, got {seed}")
    if outline is not None and outline not in SHAPES:
        raise ValueError(f"outline {outline!r}: give one of {', '.join(SHAPES)}")
    rng = np.random.default_rng([seed, 7919])
    shape = str(SHAPES[int(rng.integers(len(SHAPES)))])  # drawn either way: the later draws stay the subject's
    twin, shape = outline is not None, outline or shape
    if rng.random() < NAMED_MAIN_COLOR:
        body = str(COLORS[int(rng.integers(len(COLORS)))])
    else:
        body = _pick_color(rng, set(PALETTE))
    kinds = [str(DECORATIONS[int(rng.integers(len(DECORATIONS)))])]
    if rng.random() < SECOND_DECORATION:
        kinds.append(str(rng.choice([k for k in DECORATIONS if k not in kinds and k not in PATTERN_WORDS])))
    used = {body}
    colors = []
    for _ in kinds:
        colors.append(_pick_color(rng, used))
        used.add(colors[-1])
    masks = [_decoration(kind, rng) for kind in kinds]
    outline = SHAPE_MASKS[shape]
    # A ring's decorations may cross its hole (as the crossed ring's cross does); others stay inside.
    region = (lambda u, v: disk(u, v, 0.98)) if shape == "ring" else outline

    def paint(u: np.ndarray, v: np.ndarray) -> list[Layer]:
        inside = region(u, v)
        layers: list[Layer] = [(outline(u, v), ALL_COLORS[body])]
        for mask, color in zip(masks, colors):
            layers.append((inside & mask(u, v), ALL_COLORS[color]))
        return layers

    decorations = tuple(zip(kinds, colors))
    return Concept(
        name=procedural_name(seed) + (f"_as_{shape}" if twin else ""),
        class_word=shape,
        description=with_articles(f"a {body} {shape} with {decoration_phrase(decorations)}"),
        paint=paint,
        clashes=(body,) if body in PALETTE else (),
        color_word=body,
        pattern_word=PATTERN_WORDS.get(kinds[0]),
        decorations=decorations,
    )


def decoration_phrase(decorations: tuple[tuple[str, str], ...]) -> str:
    """'blue stripes and an orange core' for (("stripes", "blue"), ("core", "orange"))."""
    parts = []
    for kind, color in decorations:
        noun = DECORATION_NOUNS[kind]  # "a cross" or "stripes"
        parts.append(f"a {color} {noun[2:]}" if noun.startswith("a ") else f"{color} {noun}")
    return with_articles(" and ".join(parts))


def fresh_subject_name(text: str) -> str:
    """A subject a user names for a fresh test: a named concept, "procedural_<seed>" or the bare seed.

    Returns the subject's name ("3000000" and "procedural_03000000" read "procedural_3000000"). Raises
    ValueError (one line, naming the fresh range) for an unknown name, a seed that is no number or is
    above MAX_SEED, and a seed one of the world's trainings used (no fresh test of personalization).
    """
    from .concepts import CONCEPTS

    fresh = VALIDATION_SEEDS
    if text in CONCEPTS:
        return text
    name = PREFIX + text if text.isascii() and text.isdigit() else text
    if not is_procedural(name):
        raise ValueError(
            f"unknown subject {text[:40] + ('...' if len(text) > 40 else '')!r}: use a shipped one "
            f"({', '.join(sorted(CONCEPTS))}), procedural_<seed> or a bare seed for a fresh procedural subject "
            f"(e.g. {fresh.start}: seeds {fresh.start}-{fresh.stop - 1} are kept for such tests)")
    seed = _seed_of(name)
    trained = trained_on(seed)
    if trained is not None:
        what, seeds = trained
        raise ValueError(f"{procedural_name(seed)} is no fresh subject: seeds {seeds.start}-{seeds.stop - 1} trained "
                         f"{what}; pick one nobody trained on, e.g. {fresh.start} (seeds {fresh.start}-{fresh.stop - 1})")
    return procedural_name(seed)


def lookup_subject(name: str) -> Concept:
    """A named concept (concepts.CONCEPTS) or a procedural one ("procedural_<seed>", or an outline twin
    "procedural_<seed>_as_<shape>", see procedural_subject).

    Raises ValueError naming both kinds for anything else.
    """
    from .concepts import CONCEPTS

    if name in CONCEPTS:
        return CONCEPTS[name]
    if is_procedural(name):
        return procedural_subject(_seed_of(name))
    base, twin, outline = name.partition("_as_")
    if twin and is_procedural(base) and outline in SHAPES:
        return procedural_subject(_seed_of(base), outline=outline)
    raise ValueError(f"unknown subject {name!r}: use a concept {tuple(sorted(CONCEPTS))} or '{PREFIX}<seed>'")


SUBJECT_PREFIX = "miniworld/"  # how every front end names a mini-world subject's references


def subject_references(name: str) -> tuple[list, list[str]] | None:
    """The references of "miniworld/<subject>" as (PIL images, captions), drawn rather than stored; None for
    any other name (a folder, say).

    <subject> is a named concept or "procedural_<seed>" (fresh seeds: VALIDATION_SEEDS). The captions are in
    the world's grammar, "{}" standing for "<token> <class word>". Raises ValueError for an unknown subject.
    """
    from PIL import Image

    from .concepts import reference_captions, reference_images

    if not name.startswith(SUBJECT_PREFIX):
        return None
    subject = lookup_subject(name[len(SUBJECT_PREFIX):])
    return [Image.fromarray(array) for array in reference_images(subject)], reference_captions(subject)


def procedural_caption(scene: Scene, subject: Concept, rng: np.random.Generator) -> tuple[Scene, Caption]:
    """A training caption for a procedural subject, drawn as grammar captions are (training_caption).

    The noun is the class word, with the body's colour word in front when the draw keeps it, then
    either the decorations with their colours ("a large red ring with a blue cross on the left, on
    a plain yellow background") or, sometimes, the pattern word ("a red striped ring ..."). `stated`
    records shape (the class word), colour, pattern, and the first decoration and its colour where
    said, for the text encoder's pretraining heads. A template naming a size sets the scene's size.
    """
    words, said = [], {"shape": subject.class_word}
    if subject.color_word is not None and rng.random() >= OMIT_PROBABILITY:
        words.append(subject.color_word)
        said["color"] = subject.color_word
    listed = bool(subject.decorations) and rng.random() < DECORATIONS_STATED
    if not listed and subject.pattern_word is not None and rng.random() < PATTERN_STATED:
        words.append(subject.pattern_word)
        said["pattern"] = subject.pattern_word
    noun = " ".join(words + [subject.class_word])
    if listed:
        noun += f" with {decoration_phrase(subject.decorations)}"
        said["decoration"], said["decoration_color"] = subject.decorations[0]
    if rng.random() < TEMPLATE_PROBABILITY:
        template = str(rng.choice(PROMPT_TEMPLATES))
        size = next((s for s in ("small", "large") if s in template.split()), None)
        if size is not None:
            scene = Scene(scene.subject, scene.color, size, scene.position, scene.bg_color, scene.bg_pattern)
            said["size"] = size
        return scene, Caption(with_articles(template.format(noun)), said)
    stated = {"size", "position", "bg_color", "bg_pattern"}
    for name in ("size", "position"):
        if rng.random() < OMIT_PROBABILITY:
            stated.discard(name)
    if rng.random() < OMIT_PROBABILITY:
        stated -= {"bg_color", "bg_pattern"}
    caption = describe(scene, frozenset(stated), noun=noun)
    return scene, Caption(caption.text, {**caption.stated, **said})

