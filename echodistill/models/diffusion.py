"""The model calls the trainer and the samplers share: prompts, one-step student, teacher x0.

Noise convention (training and sampling alike): at t = 999 the UNet's input is exactly the unit
Gaussian noise, and the student's image latent is the x0 its prediction implies:
    z_s = (noise - sqrt(1 - ᾱ_999) · ε̂) / sqrt(ᾱ_999)            (ε-prediction)
This is what ComfyUI's samplers do for a full denoise (noise scaled by sqrt(1 + σ_max²), then
divided by it again at the model input), so an exported concept reproduces in ComfyUI. diffusers'
StableDiffusionPipeline with Euler "trailing" starts from σ_max · noise instead, a UNet input
of sqrt(1 - ᾱ_999) · noise (≈ 0.9977 · noise): its images differ from ours by about 1e-3.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from .schedule import add_noise, alphas_cumprod_from_config, predict_epsilon, predict_x0


def alphas_cumprod_for(scheduler_config: dict, device: torch.device | str = "cpu") -> torch.Tensor:
    """ᾱ_t (T,) float32 from a family's scheduler config."""
    return alphas_cumprod_from_config(
        scheduler_config.get("beta_start", 0.00085),
        scheduler_config.get("beta_end", 0.012),
        scheduler_config.get("num_train_timesteps", 1000),
        scheduler_config.get("beta_schedule", "scaled_linear"),
    ).to(device)


def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: Sequence[str]) -> torch.Tensor:
    """Prompt embeddings (B, 77, D): the encoder's last hidden state, as the SD pipelines use."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(text_encoder.device)  # (B, 77)
    return text_encoder(ids).last_hidden_state  # (B, 77, D)


def unet_call(
    unet, latents: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor
) -> torch.Tensor:
    dtype = unet.dtype
    out = unet(latents.to(dtype), timesteps, encoder_hidden_states=encoder_hidden_states.to(dtype)).sample
    return out.float()


def student_one_step(
    unet,
    noise: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    timestep: int = 999,
) -> torch.Tensor:
    """The student's one-step image latent z_s (B, 4, h, w) from unit noise at `timestep`."""
    timesteps = torch.full((noise.shape[0],), timestep, device=noise.device, dtype=torch.long)
    model_output = unet_call(unet, noise, timesteps, encoder_hidden_states)  # (B, 4, h, w)
    return predict_x0(model_output, noise, timesteps, alphas_cumprod, prediction_type)


def guided_epsilon_and_x0(
    unet,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance: float,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One classifier-free-guided evaluation (cond and uncond in one batch): (ε̂, x̂0)."""
    batch = noisy.shape[0]
    model_output = unet_call(
        unet, torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]), torch.cat([uncond.expand_as(cond), cond])
    )  # (2B, 4, h, w)
    uncond_out, cond_out = model_output[:batch], model_output[batch:]
    guided = uncond_out + guidance * (cond_out - uncond_out)
    return (
        predict_epsilon(guided, noisy, timesteps, alphas_cumprod, prediction_type),
        predict_x0(guided, noisy, timesteps, alphas_cumprod, prediction_type),
    )


@torch.no_grad()
def teacher_target(
    unet,
    student_latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance: float,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    steps: int = 1,
) -> torch.Tensor:
    """The teacher's x0 for the student's output re-noised to `timesteps` (B,).

    steps = 1: one guided x0 prediction. steps = k > 1: k deterministic DDIM steps from t to 0,
    each guided, evenly spaced per sample.
    """
    latents = add_noise(student_latents, noise, timesteps, alphas_cumprod)  # (B, 4, h, w)
    current = timesteps
    x0 = latents
    for index in range(steps):
        eps, x0 = guided_epsilon_and_x0(unet, latents, current, cond, uncond, guidance, alphas_cumprod, prediction_type)
        if index == steps - 1:
            break
        following = (timesteps * (steps - 1 - index) // steps).long()  # (B,), reaches 0 after the last step
        abar = alphas_cumprod[following].view(-1, 1, 1, 1)
        latents = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        current = following
    return x0
