"""The teacher's denoising loss and the alignment weight, as pure tensor functions.

The forward process they are written against (ᾱ_t, x_t, the three parameterizations) is
`echodistill.models.schedule`.
"""

from __future__ import annotations

import torch


def masked_denoising_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample MSE over the valid latent positions only.

    loss_b = Σ_{c,i,j} m_bij·(pred − target)²_bcij / (C·Σ_{i,j} m_bij)

    ``mask`` is (B, 1, h, w) in {0, 1} at latent resolution (the validity mask of the
    rescale augmentation) and is broadcast over channels. Masked-out positions are selected
    away with ``torch.where`` rather than multiplied by 0, so even inf/NaN there cannot
    leak into the loss or its gradient. A sample whose mask is all zero contributes exactly 0
    (the denominator is clamped to 1). Computed in float32 whatever the input dtype.

    Returns:
        (B,) float32.
    """
    if model_pred.shape != target.shape:
        raise ValueError(
            f"model_pred {tuple(model_pred.shape)} and target {tuple(target.shape)} differ in shape"
        )
    sq_err = (model_pred.float() - target.float()) ** 2  # (B, C, h, w)
    if mask is None:
        return sq_err.flatten(1).mean(dim=1)  # (B,)
    batch, channels = sq_err.shape[:2]
    if mask.ndim != sq_err.ndim or mask.shape[0] != batch or mask.shape[1] != 1:
        raise ValueError(
            f"mask must be (B, 1, h, w) = ({batch}, 1, {', '.join(map(str, sq_err.shape[2:]))}), "
            f"got {tuple(mask.shape)}"
        )
    valid = (mask > 0.5).expand_as(sq_err)  # (B, C, h, w)
    masked = torch.where(valid, sq_err, torch.zeros_like(sq_err))  # (B, C, h, w)
    count = valid.flatten(1).sum(dim=1).to(sq_err.dtype)  # (B,) = C·Σ m
    return masked.flatten(1).sum(dim=1) / count.clamp_min(1.0)  # (B,)


def alpha_bar_weight(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Per-sample weight ᾱ_t: near 1 at small t, near 0 at t = T − 1.

    The student's alignment losses are multiplied by it: a teacher target made from a
    heavily noised z_s (large t) is less trustworthy, so it counts less.

    Returns:
        (B,) float32 on the device of ``timesteps``.
    """
    alphas_cumprod = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    return alphas_cumprod[timesteps.long()]  # (B,)
