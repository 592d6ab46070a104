"""Scoring a concept on the mini world: its references, its evaluation prompts and noise, the oracle's two numbers.

A `UnitInputs` is one concept x seed: what a method trains on (the references), what it draws
(the concept's evaluation prompts, each from fixed noise) and what the drawings are scored against.
The demo scores its concept with it, and `bench quality` every row of its table: the trained
concepts, the untrained priors (`score_prior`) and the zero-training image prompt
(`score_image_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling.with_concept import sample
from .concepts import Concept, evaluation_prompts, reference_images
from .drawing import RESOLUTION
from .image_prompt import ImagePromptAdapter, image_prompt_student
from .oracle import Oracle
from .recipe import (  # noqa: F401 - the row names and sampling settings are read from here too
    IMAGE_PROMPT,
    MAX_UNIT_SEED,
    NOISE_SEEDS_PER_UNIT,
    PRIOR,
    START_PRIOR,
    TEACHER_GUIDANCE,
    TEACHER_PRIOR,
    TEACHER_STEPS,
    TOKEN,
    training_references,
)


SAMPLE_BATCH = 48  # pictures drawn per sampler call: one subject's 12 prompts x 4


@dataclass
class UnitInputs:
    """What every method of one concept x seed trains on and is scored against."""

    concept: Concept
    seed: int
    images: list  # the references as training images
    reference_pixels: torch.Tensor  # (5, 3, 64, 64) in [0, 1]
    texts: list[str]  # evaluation prompts with the token, each repeated images-per-prompt times
    stated: list[dict]  # the attributes each prompt states
    noise_seeds: list[int]  # the same noise for every method: rows differ by training alone

    @classmethod
    def build(cls, concept: Concept, seed: int, images_per_prompt: int, captions: bool = False) -> UnitInputs:
        """`captions`: train on each reference's caption in the world's grammar instead of the templates.

        Raises ValueError for a seed outside 0..MAX_UNIT_SEED (its noise seeds would not fit 64 bits)."""
        if not 0 <= seed <= MAX_UNIT_SEED:
            raise ValueError(f"seed {seed}: give 0 to {MAX_UNIT_SEED:,} (the evaluation noise is seeded "
                             f"seed x {NOISE_SEEDS_PER_UNIT:,} + i, which torch keeps in 64 bits)")
        references = reference_images(concept)  # (5, 64, 64, 3) uint8
        prompts = evaluation_prompts(concept)
        return cls(
            concept=concept, seed=seed, images=training_references(concept, captions, rendered=references),
            reference_pixels=torch.from_numpy(references).permute(0, 3, 1, 2).float() / 255.0,
            texts=[p.text.format(token=TOKEN) for p in prompts for _ in range(images_per_prompt)],
            stated=[p.stated for p in prompts for _ in range(images_per_prompt)],
            noise_seeds=[seed * NOISE_SEEDS_PER_UNIT + i for i in range(len(prompts) * images_per_prompt)],
        )

    def texts_with(self, word: str) -> list[str]:
        """The evaluation prompts with the token replaced by `word` ("" removes it), spaces tidied."""
        return [" ".join(text.replace(TOKEN, word).split()) for text in self.texts]

    def sample(self, pair, texts: list[str] | None = None, **options) -> torch.Tensor:
        """(N, 3, 64, 64) in [0, 1]: one picture per text and noise seed, drawn SAMPLE_BATCH at a time (memory
        stays that of one batch however many pictures are asked for; each picture depends on its own seed only)."""
        texts = texts or self.texts
        return torch.cat([
            sample(pair, texts[i:i + SAMPLE_BATCH], seeds=self.noise_seeds[i:i + SAMPLE_BATCH], width=RESOLUTION,
                   height=RESOLUTION, return_latents=False, **options).images
            for i in range(0, len(texts), SAMPLE_BATCH)
        ])

    def score(self, oracle: Oracle, images: torch.Tensor) -> dict[str, float]:
        return {"subject_fidelity": float(oracle.subject_fidelity(images, self.reference_pixels)),
                "prompt_fidelity": float(oracle.prompt_fidelity(images, self.stated).mean())}


def score_prior(pair, oracle: Oracle, unit: UnitInputs, row: str = PRIOR) -> tuple[dict, torch.Tensor]:
    """A class-word prior: the untrained student (or teacher) given the prompts without the token.

    START_PRIOR keeps the token at the row every method but DreamBooth-LoRA starts from, the class
    word's (its initializer): the same prompt embeddings as writing the class word in its place.
    """
    prior_texts = unit.texts_with(unit.concept.class_word if row == START_PRIOR else "")
    if row == TEACHER_PRIOR:
        images = unit.sample(pair, prior_texts, part="teacher", steps=TEACHER_STEPS, guidance=TEACHER_GUIDANCE)
    else:
        images = unit.sample(pair, prior_texts, part="student")
    record = {"concept": unit.concept.name, "seed": unit.seed, "method": row, **unit.score(oracle, images),
              "train_seconds": None, "seconds_per_step": None}
    return record, images


def score_image_prompt(pair, oracle: Oracle, unit: UnitInputs,
                       adapter: ImagePromptAdapter) -> tuple[dict, torch.Tensor]:
    """The zero-training row: the untrained student given the unit's references as an image prompt.

    The references are the pictures every trained method trains on; the prompts are the unit's
    evaluation prompts with the token removed (the class word names the subject, as in the
    adapter's training captions; the untrained tokenizer has no token). Same noise seeds, size
    (RESOLUTION) and oracle calls as every other row; nothing trains, so train_seconds is 0.
    Returns (record, images (N, 3, 64, 64) in [0, 1]). Raises ImagePromptError when the adapter
    was trained for another UNet.
    """
    images = image_prompt_student(pair, adapter, unit.reference_pixels, unit.texts_with(""), unit.noise_seeds,
                                  width=RESOLUTION, height=RESOLUTION)
    record = {"concept": unit.concept.name, "seed": unit.seed, "method": IMAGE_PROMPT, **unit.score(oracle, images),
              "train_seconds": 0.0, "seconds_per_step": 0.0}
    return record, images
