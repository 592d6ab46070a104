"""Preview images while training: what the student draws now, for progress displays."""

from __future__ import annotations

from typing import Sequence

import torch

from ..models.concept import ConceptEmbedding, reading_with_all
from ..models.pair import ModelPair
from ..sampling.samplers import sample_student
from .config import TrainConfig

PREVIEW_PROMPT = "a photo of a {token} {class_word}"


@torch.no_grad()
def preview_images(pair: ModelPair, config: TrainConfig,
                   student_rows: ConceptEmbedding | Sequence[ConceptEmbedding] | None = None,
                   count: int = 2) -> torch.Tensor:
    """One-step student images (N, 3, H, W) in [0, 1] for fixed seeds 0..N-1, read with the student's token
    row(s) (one per text encoder; None: the shared rows)."""
    prompt = PREVIEW_PROMPT.format(token=config.token, class_word=config.class_word)
    size = config.resolution
    if isinstance(student_rows, ConceptEmbedding):
        student_rows = (student_rows,)
    with reading_with_all(pair.text_encoders, student_rows):
        return sample_student(pair, [prompt] * count, seeds=list(range(count)), width=size, height=size,
                              return_latents=False).images
