"""Student-to-teacher alignment losses (DESIGN §1 step 4), per sample.

The trainer multiplies each term by ᾱ_t of the teacher's timestep
(:func:`echodistill.training.losses.diffusion.alpha_bar_weight`) before weighting and summing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def latent_mse(student_latents: torch.Tensor, target_latents: torch.Tensor) -> torch.Tensor:
    """0.5 · mean_{c,i,j} (z_s − z_t)², one value per sample.

    The paper writes 0.5·‖z_s − z_t‖²; we take the mean over C, H, W instead of the sum so
    the value does not scale with resolution: a weight tuned at 512 px (4×64×64 latents)
    keeps its meaning at 768 px or in a tiny test model, and stays on the scale of the other
    per-sample terms. The target is used as given: detach it at the call site.

    Args:
        student_latents: z_s, (B, C, h, w).
        target_latents: z_t, same shape.

    Returns:
        (B,) float32.
    """
    if student_latents.shape != target_latents.shape:
        raise ValueError(
            f"student_latents {tuple(student_latents.shape)} and target_latents "
            f"{tuple(target_latents.shape)} differ in shape"
        )
    diff = student_latents.float() - target_latents.float()  # (B, C, h, w)
    return 0.5 * diff.pow(2).flatten(1).mean(dim=1)  # (B,)


def semantic_cosine_distance(emb_a: torch.Tensor, emb_b: torch.Tensor) -> torch.Tensor:
    """1 − cos(a, b), one value per sample; 0 for parallel, 2 for opposite embeddings.

    Embeddings (B, D), or token sequences (B, N, D) which are flattened to (B, N·D) so the
    sequences are compared as one vector (position by position), not token-pooled. A zero
    vector has cosine 0 (distance 1) instead of NaN.

    Returns:
        (B,) float32.
    """
    if emb_a.shape != emb_b.shape:
        raise ValueError(
            f"emb_a {tuple(emb_a.shape)} and emb_b {tuple(emb_b.shape)} differ in shape"
        )
    if emb_a.ndim not in (2, 3):
        raise ValueError(f"embeddings must be (B, D) or (B, N, D), got {tuple(emb_a.shape)}")
    a = emb_a.float().flatten(1)  # (B, N·D)
    b = emb_b.float().flatten(1)  # (B, N·D)
    return 1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-8)  # (B,)
