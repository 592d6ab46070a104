"""Samplers against diffusers' own pipelines, against the trainer, and on concept-carrying models.

Parity is measured on the tiny random pair in fp32 on the CPU at 64x64 pixels (8x8 latents).
Run with `-s` to see the measured max-abs errors.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from echodistill.concepts.bundle import ConceptBundle
from echodistill.models.adapters import adapter_parameters, adapter_state_dict, add_custom_diffusion
from echodistill.models.concept import add_concept_token, concept_embedding, set_concept_row
from echodistill.models.diffusion import alphas_cumprod_for, encode_prompts, student_one_step
from echodistill.models.pair import load_model_pair
from echodistill.sampling.samplers import (
    SamplingError,
    denoise,
    euler_trailing_schedule,
    get_sampler,
    initial_noise,
    sample_student,
    sample_teacher,
)

SIZE = 64  # pixels; the tiny VAE and UNet each downscale by 8
PROMPTS = ["a photo of a dog", "a red car on a street", "a photo of a dog"]  # a repeat: encoded once
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def pair(tiny_pair_folders):
    return load_model_pair(*tiny_pair_folders)


@pytest.fixture(scope="module")
def v_pair(tiny_world, tiny_pair_folders):
    """The tiny teacher read with the SD 2.1 768-v config: a v-prediction teacher."""
    return load_model_pair(*tiny_pair_folders, teacher_family=tiny_world["families"]["tiny-sd21v"])


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _pipeline(pair, unet, scheduler) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=pair.vae, text_encoder=pair.text_encoder, tokenizer=pair.tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_outputs(pipe, prompts, seeds, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, images) from diffusers: output_type "latent" and "pt", same generators."""
    common = dict(prompt=prompts, height=SIZE, width=SIZE, **kwargs)
    latents = pipe(output_type="latent", generator=_generators(seeds), **common).images
    images = pipe(output_type="pt", generator=_generators(seeds), **common).images
    return latents, images


def report(what: str, ours, latents, images) -> tuple[float, float]:
    latent_err = (ours.latents - latents).abs().max().item()
    image_err = (ours.images - images).abs().max().item()
    print(f"\n{what}: max|Δlatents| {latent_err:.3g} (|latents| ≤ {latents.abs().max():.3g}), "
          f"max|Δimages| {image_err:.3g}")
    return latent_err, image_err


# --- noise ----------------------------------------------------------------------------------

def test_noise_is_what_diffusers_draws_from_a_list_of_generators():
    ours = initial_noise(SEEDS, (4, 8, 8))
    theirs = randn_tensor((3, 4, 8, 8), generator=_generators(SEEDS), device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(ours, theirs)


# --- parity with diffusers -----------------------------------------------------------------

@pytest.mark.parametrize(("steps", "guidance"), [(1, 0.0), (2, 0.0), (4, 0.0), (1, 3.0)])
def test_student_matches_diffusers_euler_trailing(pair, steps, guidance):
    ours = sample_student(pair, PROMPTS, seeds=SEEDS, steps=steps, guidance=guidance, width=SIZE, height=SIZE)
    scheduler = EulerDiscreteScheduler.from_config(pair.student.scheduler_config)
    pipe = _pipeline(pair, pair.student.unet, scheduler)
    # diffusers starts Euler "trailing" at σ_max·noise (init_noise_sigma = σ_max), i.e. a UNet input of
    # sqrt(1 − ᾱ_999)·noise; the trainer, SD-Turbo's reference sampler and ComfyUI start at unit noise
    # (σ-space sqrt(1 + σ_max²)·noise). Handing diffusers its own draw rescaled to that start makes the
    # two samplers comparable step for step; the next test pins the difference of the default start.
    scheduler.set_timesteps(steps)
    sigma_max = scheduler.sigmas[0]
    noise = randn_tensor((len(SEEDS), 4, 8, 8), generator=_generators(SEEDS), dtype=torch.float32)
    start = noise * (sigma_max**2 + 1).sqrt() / sigma_max
    latents, images = pipeline_outputs(pipe, PROMPTS, SEEDS, num_inference_steps=steps, guidance_scale=guidance,
                                        latents=start)
    latent_err, image_err = report(f"student {steps} step(s), guidance {guidance}", ours, latents, images)
    # Relative bound: latents reach |53| here, since 1/sqrt(ᾱ_999) amplifies ε̂ about 15x.
    assert latent_err < 1e-5 * latents.abs().max()
    assert image_err < 1e-5


@pytest.mark.parametrize("steps", [1, 2])
def test_diffusers_default_start_is_the_same_sampler_from_scaled_noise(pair, steps):
    """With only generators, diffusers equals our sampler started from sqrt(1 − ᾱ_999)·noise."""
    config = pair.student.scheduler_config
    alphas_cumprod = alphas_cumprod_for(config)
    schedule = euler_trailing_schedule(config, steps, alphas_cumprod)
    cond = encode_prompts(pair.tokenizer, pair.text_encoder, PROMPTS)
    with torch.no_grad():
        scaled = initial_noise(SEEDS, (4, 8, 8)) * (1 - alphas_cumprod[999]).sqrt()
        latents = denoise(pair.student.unet, scaled, cond, None, 0.0, schedule, alphas_cumprod,
                          pair.student.prediction_type)
    pipe = _pipeline(pair, pair.student.unet, EulerDiscreteScheduler.from_config(config))
    theirs, _ = pipeline_outputs(pipe, PROMPTS, SEEDS, num_inference_steps=steps, guidance_scale=0.0)
    same = (latents - theirs).abs().max().item()
    assert same < 1e-5 * theirs.abs().max()
    ours = sample_student(pair, PROMPTS, seeds=SEEDS, steps=steps, width=SIZE, height=SIZE)
    gap = (ours.latents - theirs).abs().max().item()
    print(f"\nstudent {steps} step(s), diffusers' default start: max|Δlatents| {same:.3g} from scaled noise, "
          f"{gap:.3g} from unit noise")
    assert gap > 1e-3  # a real difference of convention, not round-off


@pytest.mark.parametrize("which", ["epsilon", "v_prediction"])
def test_teacher_matches_diffusers_ddim_with_cfg(pair, v_pair, which):
    model_pair = pair if which == "epsilon" else v_pair
    assert model_pair.teacher.prediction_type == which
    ours = sample_teacher(model_pair, PROMPTS, seeds=SEEDS, steps=5, guidance=7.5, width=SIZE, height=SIZE)
    pipe = _pipeline(model_pair, model_pair.teacher.unet, DDIMScheduler.from_config(model_pair.teacher.scheduler_config))
    latents, images = pipeline_outputs(pipe, PROMPTS, SEEDS, num_inference_steps=5, guidance_scale=7.5)
    latent_err, image_err = report(f"teacher DDIM 5 steps, CFG 7.5, {which}", ours, latents, images)
    assert latent_err < 1e-5 * latents.abs().max()
    assert image_err < 1e-5


# --- the trainer's convention --------------------------------------------------------------

def test_one_step_is_the_trainers_student_one_step(pair):
    prompts = ["a photo of a dog", "a red car on a street"]
    ours = sample_student(pair, prompts, seeds=[5, 6], width=SIZE, height=SIZE)
    with torch.no_grad():
        cond = encode_prompts(pair.tokenizer, pair.text_encoder, prompts)
        trainer = student_one_step(pair.student.unet, initial_noise([5, 6], (4, 8, 8)), cond,
                                   alphas_cumprod_for(pair.student.scheduler_config), pair.student.prediction_type)
    assert torch.equal(ours.latents, trainer)


# --- seeds, sizes, arguments ----------------------------------------------------------------

def test_seeds_reproduce_differ_and_follow_the_image(pair):
    prompt = ["a photo of a dog"] * 2
    first = sample_student(pair, prompt, seeds=[1, 2], width=SIZE, height=SIZE)
    again = sample_student(pair, prompt, seeds=[1, 2], width=SIZE, height=SIZE)
    swapped = sample_student(pair, prompt, seeds=[2, 1], width=SIZE, height=SIZE)
    assert torch.equal(first.images, again.images)
    assert (first.images[0] - first.images[1]).abs().max() > 1e-3
    torch.testing.assert_close(swapped.images, first.images.flip(0), rtol=0, atol=1e-6)


def test_one_int_seed_gives_consecutive_seeds_and_latents_are_optional(pair):
    result = sample_student(pair, ["a", "b"], seeds=7, width=SIZE, height=SIZE, return_latents=False)
    assert result.seeds == [7, 8] and result.prompts == ["a", "b"]
    assert result.latents is None
    assert result.images.shape == (2, 3, SIZE, SIZE) and result.images.dtype == torch.float32
    assert 0 <= result.images.min() and result.images.max() <= 1


@pytest.mark.parametrize("sampler", ["student", "teacher"])
def test_sizes_that_the_models_cannot_take_are_refused(pair, sampler):
    with pytest.raises(SamplingError, match=r"width=96 must be a positive multiple of 64 .*e\.g\. 128"):
        get_sampler(sampler)(pair, ["a dog"], seeds=[0], width=96, height=SIZE)
    with pytest.raises(SamplingError, match="height=72 must be a positive multiple of 64"):
        get_sampler(sampler)(pair, ["a dog"], seeds=[0], width=SIZE, height=72)


def test_bad_arguments_are_refused(pair):
    with pytest.raises(SamplingError, match="got 2 seeds for 3 prompts"):
        sample_student(pair, PROMPTS, seeds=[0, 1], width=SIZE, height=SIZE)
    with pytest.raises(SamplingError, match="steps=0 must be an integer from 1 to 1000"):
        sample_teacher(pair, ["a dog"], seeds=[0], steps=0, width=SIZE, height=SIZE)
    with pytest.raises(SamplingError, match="unknown sampler 'dpm': use one of student, teacher"):
        get_sampler("dpm")


# --- concept-carrying models ----------------------------------------------------------------

def _bundle(base, token: str, delta_scale: float) -> ConceptBundle:
    """A concept made by hand on a fresh pair: a random token row and random student K/V deltas."""
    add_concept_token(base.tokenizer, base.text_encoder, token, "dog")
    generator = torch.Generator().manual_seed(0)
    row = torch.randn(base.text_encoder.config.hidden_size, generator=generator)
    set_concept_row(base.text_encoder, row)
    add_custom_diffusion(base.student.unet)
    with torch.no_grad():
        for param in adapter_parameters(base.student.unet):
            param.copy_(torch.randn(param.shape, generator=generator) * delta_scale)
    return ConceptBundle(
        token=token, initializer="dog", class_word="dog",
        embedding=concept_embedding(base.text_encoder).concept_row.detach().clone(), adapter="custom_diffusion",
        student_adapter=adapter_state_dict(base.student.unet), teacher_adapter={},
        fingerprints=base.fingerprints(), families={"teacher": base.teacher.family, "student": base.student.family},
    )


def test_concept_token_changes_only_the_prompts_that_use_it(pair, tiny_pair_folders, tmp_path):
    prompts = ["a photo of a dog", "a photo of a <v*> dog"]
    before = sample_student(pair, prompts, seeds=[3, 3], width=SIZE, height=SIZE)
    path = _bundle(load_model_pair(*tiny_pair_folders), "<v*>", delta_scale=0.0).save(tmp_path / "concept.safetensors")
    applied = load_model_pair(*tiny_pair_folders)
    ConceptBundle.load(path).apply(applied, parts=("student",))
    after = sample_student(applied, prompts, seeds=[3, 3], width=SIZE, height=SIZE)
    assert torch.equal(after.images[0], before.images[0])
    assert (after.images[1] - before.images[1]).abs().max() > 1e-3


def test_bundle_applied_student_samples_like_the_one_it_was_made_from(pair, tiny_pair_folders, tmp_path):
    prompts = ["a photo of a dog", "a photo of a <v*> dog"]
    by_hand = load_model_pair(*tiny_pair_folders)
    path = _bundle(by_hand, "<v*>", delta_scale=0.05).save(tmp_path / "concept.safetensors")
    applied = load_model_pair(*tiny_pair_folders)
    ConceptBundle.load(path).apply(applied, parts=("student",))
    ours = sample_student(applied, prompts, seeds=[3, 4], steps=2, width=SIZE, height=SIZE)
    assert torch.equal(ours.images, sample_student(by_hand, prompts, seeds=[3, 4], steps=2, width=SIZE, height=SIZE).images)
    # K/V deltas act on every prompt's keys and values, so the plain prompt changes too ...
    base = sample_student(pair, prompts[:1], seeds=[3], steps=2, width=SIZE, height=SIZE)
    assert (ours.images[0] - base.images[0]).abs().max() > 1e-3
    # ... but only in the student: the teacher has no adapter and no plain-prompt change.
    teacher_kwargs = dict(seeds=[3], steps=2, width=SIZE, height=SIZE)
    assert torch.equal(sample_teacher(applied, prompts[:1], **teacher_kwargs).images,
                       sample_teacher(pair, prompts[:1], **teacher_kwargs).images)


# --- lower precision ------------------------------------------------------------------------

def test_bf16_models_sample_finite_images(tiny_pair_folders):
    bf16 = load_model_pair(*tiny_pair_folders, dtype="bf16")
    for result in (sample_student(bf16, PROMPTS, seeds=SEEDS, width=SIZE, height=SIZE),
                   sample_student(bf16, PROMPTS, seeds=SEEDS, steps=2, guidance=2.0, width=SIZE, height=SIZE),
                   sample_teacher(bf16, PROMPTS, seeds=SEEDS, steps=3, width=SIZE, height=SIZE)):
        assert result.images.dtype == torch.float32 and torch.isfinite(result.images).all()
        assert torch.isfinite(result.latents).all()
    with pytest.raises(SamplingError, match="fp32 sampling needs a pair loaded in fp32"):
        sample_student(bf16, PROMPTS, seeds=SEEDS, width=SIZE, height=SIZE, dtype="fp32")


def test_bf16_autocast_of_fp32_models_stays_close(pair):
    full = sample_student(pair, PROMPTS, seeds=SEEDS, width=SIZE, height=SIZE)
    half = sample_student(pair, PROMPTS, seeds=SEEDS, width=SIZE, height=SIZE, dtype=torch.bfloat16)
    assert torch.isfinite(half.latents).all()
    drift = (half.images - full.images).abs().mean().item()
    print(f"\nbf16 autocast vs fp32: mean|Δimages| {drift:.3g}")
    assert drift < 0.02


def test_a_trained_concept_samples_from_its_bundle_as_it_did_in_place(tiny_pair_folders, tmp_path):
    """Both sides: what `jobs.sample` draws from a saved bundle is what the trained pair drew."""
    from PIL import Image

    from echodistill.jobs.runs import sample
    from echodistill.models.pristine import pristine
    from echodistill.training.config import TrainConfig
    from echodistill.training.photos import load_concept_images
    from echodistill.training.trainer import Trainer

    trained = load_model_pair(*tiny_pair_folders)
    images = load_concept_images([Image.new("RGB", (64, 64), (200, 30, 30))] * 2, resolution=64)
    config = TrainConfig(steps=2, resolution=64, class_word="dog", echo=False, sample_every=0, save_every=0,
                         lr_teacher=1e-2, lr_student=1e-2)  # large enough that the concept visibly moves
    prompts, kwargs = ["a photo of a <v*> dog"], dict(seeds=[5], width=SIZE, height=SIZE)
    with pristine(trained):
        bundle = Trainer(trained, images, config).train()
        in_place = {"student": sample_student(trained, prompts, **kwargs).images,
                    "teacher": sample_teacher(trained, prompts, steps=3, **kwargs).images}
    path = bundle.save(tmp_path / "concept.safetensors")
    fresh = load_model_pair(*tiny_pair_folders)
    for part, options in (("student", {}), ("teacher", {"steps": 3})):
        from_bundle = sample(fresh, prompts, concept=ConceptBundle.load(path), part=part, return_latents=False,
                             **kwargs, **options).images
        torch.testing.assert_close(from_bundle, in_place[part], atol=1e-5, rtol=0)
    untrained = sample_teacher(fresh, ["a photo of a dog"], steps=3, **kwargs).images
    assert (in_place["teacher"] - untrained).abs().max() > 1e-3
