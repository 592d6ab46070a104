"""Two-class (real / fake) adversarial losses on discriminator-head logits, per sample.

Each discriminator head outputs (B, 2) logits; column ``REAL`` scores "a real photo of the
concept", column ``FAKE`` "a student output". Softmax cross-entropy over the two columns is
the same as a logistic loss on the margin logit[REAL] − logit[FAKE].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REAL = 1
FAKE = 0


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if logits.ndim != 2 or logits.shape[1] != 2:
        raise ValueError(f"{name} must be (B, 2) logits, got {tuple(logits.shape)}")


def _cross_entropy_to(logits: torch.Tensor, label: int) -> torch.Tensor:
    """−log softmax(logits)[label] per row, in float32. (B, 2) -> (B,)."""
    labels = torch.full((logits.shape[0],), label, dtype=torch.long, device=logits.device)  # (B,)
    return F.cross_entropy(logits.float(), labels, reduction="none")  # (B,)


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: CE(D(x_s), REAL) = −log p_D(real | x_s).

    Large while the discriminator confidently calls the student output fake, so the student
    gets a strong gradient exactly when it most needs one (the saturating form
    log(1 − p_D(real)) would be flat there).

    Args:
        fake_logits: (B, 2) head logits on student outputs (not detached).

    Returns:
        (B,) float32.
    """
    _check_logits("fake_logits", fake_logits)
    return _cross_entropy_to(fake_logits, REAL)  # (B,)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Per-pair discriminator loss ½[CE(D(x_r), REAL) + CE(D(sg[x_s]), FAKE)].

    Row b pairs real image b with student output b, so both batches must have the same
    size B; a mismatch raises ``ValueError`` rather than being silently averaged. (The
    trainer draws as many student samples as real images per step, so they always match;
    a caller with unequal sets can average each part itself.)

    Args:
        real_logits: (B, 2) head logits on real concept images.
        fake_logits: (B, 2) head logits on detached student outputs.

    Returns:
        (B,) float32.
    """
    _check_logits("real_logits", real_logits)
    _check_logits("fake_logits", fake_logits)
    if real_logits.shape[0] != fake_logits.shape[0]:
        raise ValueError(
            f"discriminator_loss pairs real and fake samples row by row: got "
            f"{real_logits.shape[0]} real and {fake_logits.shape[0]} fake; pass equal batches"
        )
    real_term = _cross_entropy_to(real_logits, REAL)  # (B,)
    fake_term = _cross_entropy_to(fake_logits, FAKE)  # (B,)
    return 0.5 * (real_term + fake_term)  # (B,)


def real_probability(logits: torch.Tensor) -> torch.Tensor:
    """p_D(real | x) = softmax(logits)[:, REAL], (B, 2) -> (B,); for ranking echo samples."""
    _check_logits("logits", logits)
    return logits.float().softmax(dim=1)[:, REAL]  # (B,)
