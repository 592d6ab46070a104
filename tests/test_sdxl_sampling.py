"""SDXL samplers against diffusers' StableDiffusionXLPipeline, on the tiny random SDXL pair.

Parity is measured in fp32 on the CPU at 64x64 pixels (8x8 latents), from the same noise, as
tests/test_sampling.py does for SD 2.x. Run with `-s` to see the measured max-abs errors.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline
from diffusers.utils.torch_utils import randn_tensor

from echodistill.models.diffusion import alphas_cumprod_for, student_one_step
from echodistill.models.pair import load_model_pair
from echodistill.sampling.samplers import SamplingError, sample_student, sample_teacher
from echodistill.sampling.speed import SamplerOptions

import test_sampling as parity  # the SD 2.x parity helpers: diffusers' outputs and the report
from test_sampling import _generators

SIZE = 64
PROMPTS = ["a photo of a dog", "a red car on a street", "a photo of a dog"]
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def pair(tiny_sdxl_folders):
    return load_model_pair(*tiny_sdxl_folders)


def _pipeline(pair, unet, scheduler) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline(
        vae=pair.vae, text_encoder=pair.text_encoder, text_encoder_2=pair.text_encoder_2, tokenizer=pair.tokenizer,
        tokenizer_2=pair.tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_outputs(pipe, seeds, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return parity.pipeline_outputs(pipe, PROMPTS, seeds, **kwargs)


def _report(what: str, ours, latents, images) -> tuple[float, float]:
    return parity.report(f"SDXL {what}", ours, latents, images)


@pytest.mark.parametrize(("steps", "guidance"), [(1, 0.0), (2, 0.0), (4, 0.0), (1, 3.0)])
def test_student_matches_diffusers_sdxl_pipeline(pair, steps, guidance):
    ours = sample_student(pair, PROMPTS, seeds=SEEDS, steps=steps, guidance=guidance, width=SIZE, height=SIZE)
    scheduler = EulerDiscreteScheduler.from_config(pair.student.scheduler_config)
    scheduler.set_timesteps(steps)
    assert int(scheduler.timesteps[0]) == 999  # trailing spacing: the one step is t = 999
    # Our start is unit noise (the trainer's and ComfyUI's convention); diffusers starts at σ_max·noise:
    # hand it its own draw rescaled to our start, as the SD 2.x parity test does.
    sigma_max = scheduler.sigmas[0]
    noise = randn_tensor((len(SEEDS), 4, 8, 8), generator=_generators(SEEDS), dtype=torch.float32)
    start = noise * (sigma_max**2 + 1).sqrt() / sigma_max
    latents, images = _pipeline_outputs(_pipeline(pair, pair.student.unet, scheduler), SEEDS, latents=start,
                                        num_inference_steps=steps, guidance_scale=guidance)
    latent_err, image_err = _report(f"student {steps} step(s), guidance {guidance}", ours, latents, images)
    assert latent_err < 1e-5 * latents.abs().max()
    assert image_err < 1e-5


def test_teacher_matches_diffusers_sdxl_pipeline_ddim_with_cfg(pair):
    assert pair.teacher.prediction_type == "epsilon"
    ours = sample_teacher(pair, PROMPTS, seeds=SEEDS, steps=5, guidance=7.5, width=SIZE, height=SIZE)
    pipe = _pipeline(pair, pair.teacher.unet, DDIMScheduler.from_config(pair.teacher.scheduler_config))
    # No negative prompt: SDXL's pipeline then uses zero conditioning (force_zeros_for_empty_prompt), as ours does.
    latents, images = _pipeline_outputs(pipe, SEEDS, num_inference_steps=5, guidance_scale=7.5)
    latent_err, image_err = _report("teacher DDIM 5 steps, CFG 7.5", ours, latents, images)
    assert latent_err < 1e-5 * latents.abs().max()
    assert image_err < 1e-5


def test_teacher_with_a_negative_prompt_matches_diffusers(pair):
    ours = sample_teacher(pair, PROMPTS, seeds=SEEDS, steps=3, guidance=5.0, negative_prompt="blurry", width=SIZE,
                          height=SIZE)
    pipe = _pipeline(pair, pair.teacher.unet, DDIMScheduler.from_config(pair.teacher.scheduler_config))
    latents, images = _pipeline_outputs(pipe, SEEDS, num_inference_steps=3, guidance_scale=5.0,
                                        negative_prompt="blurry")
    latent_err, _ = _report("teacher DDIM 3 steps, CFG 5, negative prompt", ours, latents, images)
    assert latent_err < 1e-5 * latents.abs().max()


def test_one_step_is_the_trainers_student_one_step_with_size_conditioning(pair):
    ours = sample_student(pair, PROMPTS[:2], seeds=SEEDS[:2], width=SIZE, height=SIZE)
    cond = pair.conditioner.encode(PROMPTS[:2], size=(SIZE, SIZE))
    noise = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in SEEDS[:2]])
    with torch.no_grad():
        latents = student_one_step(pair.student.unet, noise, cond, alphas_cumprod_for(pair.student.scheduler_config),
                                   "epsilon")
    assert torch.allclose(ours.latents, latents, atol=1e-5)
    # The size ids reach the UNet: another size gives other latents from the same noise.
    other = pair.conditioner.encode(PROMPTS[:2], size=(2 * SIZE, 2 * SIZE))
    with torch.no_grad():
        moved = student_one_step(pair.student.unet, noise, other, alphas_cumprod_for(pair.student.scheduler_config),
                                 "epsilon")
    assert (moved - latents).abs().max() > 1e-4


def test_long_prompts_are_read_whole_and_cuda_graph_is_refused(pair):
    long = "a photo of a dog " + "in a very green and sunny park " * 12  # > 75 tokens: two windows
    result = sample_student(pair, [long, "a cat"], seeds=[0, 1], width=SIZE, height=SIZE)
    assert result.images.shape == (2, 3, SIZE, SIZE) and torch.isfinite(result.images).all()
    with pytest.raises(SamplingError, match="cuda_graph=True captures SD 1.x / 2.x students only"):
        sample_student(pair, ["a cat"], seeds=[0], width=SIZE, height=SIZE, options=SamplerOptions(cuda_graph=True))
