"""Preview images while training: what the student draws now, for progress displays."""

from __future__ import annotations

import torch

from ..models.concept import ConceptEmbedding, reading_with
from ..models.pair import ModelPair
from ..sampling.samplers import sample_student
from .config import TrainConfig

PREVIEW_PROMPT = "a photo of a {token} {class_word}"


@torch.no_grad()
def preview_images(pair: ModelPair, config: TrainConfig, student_row: ConceptEmbedding | None = None,
                   count: int = 2) -> torch.Tensor:
    """One-step student images (N, 3, H, W) in [0, 1] for fixed seeds 0..N-1, read with the student's token row."""
    prompt = PREVIEW_PROMPT.format(token=config.token, class_word=config.class_word)
    size = config.resolution
    with reading_with(pair.text_encoder, student_row):
        return sample_student(pair, [prompt] * count, seeds=list(range(count)), width=size, height=size,
                              return_latents=False).images
