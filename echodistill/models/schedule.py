"""The DDPM forward process as pure tensor functions: noise schedule, noising, parameterizations.

Training (its losses) and sampling both build on these; the losses re-export what they use.

Notation: ``ᾱ_t = alphas_cumprod[t]``; the forward process is
``x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε``. A UNet predicts one of three parameterizations,
named as in diffusers' ``prediction_type``:

- ``"epsilon"``: ε
- ``"v_prediction"``: v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x_0
- ``"sample"``: x_0

The teacher (SD 2.1) may be either ε (512 base) or v (768) — the caller reads it from the
checkpoint's scheduler config; nothing here assumes one.
"""

from __future__ import annotations

from typing import Literal

import torch

PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES: tuple[str, ...] = ("scaled_linear", "linear")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type={prediction_type!r} is unknown; valid: {', '.join(PREDICTION_TYPES)}"
        )


def _alpha_bar(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    """ᾱ_t for each sample, shaped to broadcast against ``like`` (B, ...) -> (B, 1, ..., 1)."""
    alphas_cumprod = alphas_cumprod.to(device=like.device, dtype=like.dtype)
    timesteps = timesteps.to(device=like.device, dtype=torch.long)
    alpha_bar = alphas_cumprod[timesteps]  # (B,)
    return alpha_bar.reshape(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, 1)


def alphas_cumprod_from_config(
    beta_start: float,
    beta_end: float,
    num_train_timesteps: int,
    beta_schedule: str,
) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s) for the schedules SD checkpoints use.

    ``"linear"``: β = linspace(β_start, β_end, T); ``"scaled_linear"`` (every SD 1.x/2.x and
    SD-Turbo): β = linspace(sqrt(β_start), sqrt(β_end), T)². Computed in float32 like
    diffusers' schedulers, so results match theirs bit for bit.

    Returns:
        (T,) float32 tensor on the CPU.
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps={num_train_timesteps} must be at least 1")
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = (
            torch.linspace(
                beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32
            )
            ** 2
        )  # (T,)
    else:
        raise ValueError(
            f"beta_schedule={beta_schedule!r} is unknown; valid: {', '.join(BETA_SCHEDULES)}"
        )
    return torch.cumprod(1.0 - betas, dim=0)  # (T,)


def add_noise(
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε (the same as ``DDPMScheduler.add_noise``).

    Args:
        latents: x_0, (B, C, h, w).
        noise: ε, same shape.
        timesteps: (B,) integer timesteps in [0, T).
        alphas_cumprod: (T,) from :func:`alphas_cumprod_from_config`.
    """
    alpha_bar = _alpha_bar(alphas_cumprod, timesteps, latents)  # (B, 1, 1, 1)
    return alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise  # (B, C, h, w)


def denoising_target(
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: PredictionType,
) -> torch.Tensor:
    """What the UNet should output at x_t: ε, v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x_0, or x_0.

    The v branch equals ``DDPMScheduler.get_velocity``. Unknown ``prediction_type`` raises
    ``ValueError`` listing the valid names.
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return latents
    alpha_bar = _alpha_bar(alphas_cumprod, timesteps, latents)  # (B, 1, 1, 1)
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents  # (B, C, h, w)


def predict_x0(
    model_output: torch.Tensor,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: PredictionType,
) -> torch.Tensor:
    """Invert the parameterization to x̂_0.

    - ε: x̂_0 = (x_t − sqrt(1 − ᾱ_t)·ε̂) / sqrt(ᾱ_t)
    - v: x̂_0 = sqrt(ᾱ_t)·x_t − sqrt(1 − ᾱ_t)·v̂
    - sample: x̂_0 = output

    ε-models divide by sqrt(ᾱ_t), which is ~0.068 at t = 999 with the SD schedule: errors in
    ε̂ are amplified ~15x there; v-models have no such division.
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "sample":
        return model_output
    alpha_bar = _alpha_bar(alphas_cumprod, timesteps, noisy_latents)  # (B, 1, 1, 1)
    if prediction_type == "epsilon":
        return (noisy_latents - (1 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()
    return alpha_bar.sqrt() * noisy_latents - (1 - alpha_bar).sqrt() * model_output


def predict_epsilon(
    model_output: torch.Tensor,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: PredictionType,
) -> torch.Tensor:
    """Invert the parameterization to ε̂ (what DDIM needs besides x̂_0).

    - ε: ε̂ = output
    - v: ε̂ = sqrt(1 − ᾱ_t)·x_t + sqrt(ᾱ_t)·v̂
    - sample: ε̂ = (x_t − sqrt(ᾱ_t)·x̂_0) / sqrt(1 − ᾱ_t)
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return model_output
    alpha_bar = _alpha_bar(alphas_cumprod, timesteps, noisy_latents)  # (B, 1, 1, 1)
    if prediction_type == "v_prediction":
        return (1 - alpha_bar).sqrt() * noisy_latents + alpha_bar.sqrt() * model_output
    return (noisy_latents - alpha_bar.sqrt() * model_output) / (1 - alpha_bar).sqrt()
