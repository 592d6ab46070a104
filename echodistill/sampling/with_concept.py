"""Sampling with a trained concept applied for one call only: the pair is handed back unchanged."""

from __future__ import annotations

from typing import Iterable, Protocol

import torch

from ..models.pair import ModelPair
from ..models.pristine import pristine
from .samplers import SampleResult, sample_student, sample_teacher


class Concept(Protocol):
    """What a concept needs to be sampled: writing itself into a pair (a concepts.ConceptBundle does)."""

    def apply(self, pair: ModelPair, parts: Iterable[str] = ...) -> None: ...


def sample(
    pair: ModelPair,
    prompts: list[str],
    *,
    concept: Concept | None = None,
    part: str = "student",
    **options,
) -> SampleResult:
    """Student (one step by default) or teacher images, with `concept` applied for this call only."""
    sampler = sample_student if part == "student" else sample_teacher
    # Outside inference mode: the concept's token row and adapters are written into the pair's
    # (ordinary) tensors and taken out again, which inference mode forbids.
    with torch.inference_mode(False), torch.no_grad(), pristine(pair):
        if concept is not None:
            concept.apply(pair, parts=(part,))
        return sampler(pair, prompts, **options)
