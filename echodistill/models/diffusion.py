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

import math
from typing import Sequence

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from .conditioning import Conditioning, as_conditioning
from .schedule import add_noise, alphas_cumprod_from_config, predict_epsilon, predict_x0
from .tokenizer import COMFYUI_MAX_WORD_LENGTH, prompt_chunks, token_ids  # noqa: F401 - re-exported


def alphas_cumprod_for(scheduler_config: dict, device: torch.device | str = "cpu") -> torch.Tensor:
    """ᾱ_t (T,) float32 from a family's scheduler config."""
    return alphas_cumprod_from_config(
        scheduler_config.get("beta_start", 0.00085),
        scheduler_config.get("beta_end", 0.012),
        scheduler_config.get("num_train_timesteps", 1000),
        scheduler_config.get("beta_schedule", "scaled_linear"),
    ).to(device)


def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: Sequence[str]) -> torch.Tensor:
    """Prompt embeddings (B, 77, D): the encoder's last hidden state, as the SD 1.x / 2.x pipelines use.

    Training's encoder: a prompt over 75 tokens is cut (with a warning naming it). The samplers
    read long prompts whole, as ComfyUI does: `encode_long_prompts`. Every family (SDXL's two
    encoders included) goes through `PromptConditioner` (`pair.conditioner`); this is its SD 1.x / 2.x case.
    """
    ids = token_ids(tokenizer, prompts).to(text_encoder.device)  # (B, 77)
    return text_encoder(ids).last_hidden_state  # (B, 77, D)


def encode_long_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel,
                        prompts: Sequence[str]) -> list[torch.Tensor]:
    """Per prompt, its embeddings (77·k, D): each 77-token window of `prompt_chunks` encoded on
    its own and concatenated, as ComfyUI's CLIPTextEncode does; k = 1 up to 75 tokens, where it
    equals `encode_prompts`. One encoder call for all windows of all prompts."""
    chunks = [prompt_chunks(tokenizer, prompt) for prompt in prompts]
    if not chunks:
        return []
    ids = torch.tensor([window for windows in chunks for window in windows], device=text_encoder.device)  # (W, 77)
    states = text_encoder(ids).last_hidden_state  # (W, 77, D)
    out, first = [], 0
    for windows in chunks:
        out.append(states[first:first + len(windows)].reshape(-1, states.shape[-1]))  # (77·k, D)
        first += len(windows)
    return out


def same_length(embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, L, D) from prompt embeddings (L_i, D) of different lengths, each repeated whole up to the
    least common multiple L (as ComfyUI batches conds of different lengths). Repeating every key
    and value of cross-attention the same number of times leaves attention's result unchanged."""
    target = math.lcm(*(e.shape[0] for e in embeddings))
    return torch.stack([e.repeat(target // e.shape[0], 1) for e in embeddings])


def unet_call(
    unet, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning | torch.Tensor
) -> torch.Tensor:
    """The UNet's output (B, 4, h, w) float32 for latents (B, 4, h, w) at timesteps (B,), conditioned on
    `cond`: a `Conditioning` (every family; SDXL's added `text_embeds` / `time_ids` included) or a bare
    prompt-state tensor (B, L, D) for SD 1.x / 2.x. Inputs are cast to the UNet's dtype."""
    dtype = unet.dtype
    out = unet(latents.to(dtype), timesteps, **as_conditioning(cond).unet_kwargs(dtype)).sample
    return out.float()


def student_one_step(
    unet,
    noise: torch.Tensor,
    encoder_hidden_states: Conditioning | torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    timestep: int = 999,
) -> torch.Tensor:
    """The student's one-step image latent z_s (B, 4, h, w) from unit noise at `timestep`, conditioned
    on a `Conditioning` (or SD 1.x / 2.x prompt states (B, L, D))."""
    timesteps = torch.full((noise.shape[0],), timestep, device=noise.device, dtype=torch.long)
    model_output = unet_call(unet, noise, timesteps, encoder_hidden_states)  # (B, 4, h, w)
    return predict_x0(model_output, noise, timesteps, alphas_cumprod, prediction_type)


def guided_epsilon_and_x0(
    unet,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning | torch.Tensor,
    uncond: Conditioning | torch.Tensor,
    guidance: float,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One classifier-free-guided evaluation (cond and uncond in one batch): (ε̂, x̂0).

    `uncond` has batch 1 or B (it is expanded to B); both are Conditionings or both tensors."""
    batch = noisy.shape[0]
    cond, uncond = as_conditioning(cond), as_conditioning(uncond)
    both = Conditioning.cat([uncond.expand(batch), cond])  # batch 2B: unconditional first
    model_output = unet_call(unet, torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]), both)  # (2B, 4, h, w)
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
    cond: Conditioning | torch.Tensor,
    uncond: Conditioning | torch.Tensor,
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
