"""Samplers: the student in one step at t = 999 (or a few Euler "trailing" steps), the teacher
with DDIM and classifier-free guidance.

    result = sample_student(pair, ["a photo of a <v*> dog"], seeds=[0], width=512, height=512)
    result.images   # (1, 3, 512, 512) float32 in [0, 1], CPU

Seeds. Image i starts from its own noise,
    torch.randn((1, 4, h, w), generator=torch.Generator("cpu").manual_seed(seeds[i]))
drawn in float32 on the CPU and then moved to the models' device. This is exactly what
diffusers' StableDiffusionPipeline draws when given `generator=[torch.Generator().manual_seed(s)
for s in seeds]` (with fp32 models), so a seed gives the same noise here, in diffusers, on any
device and at any batch position.

Noise convention: the trainer's (see `echodistill.models.diffusion`). Latents live in the DDPM scaling
x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε, so at t = 999 the UNet's input is the unit noise itself
and one student step is `student_one_step`. Deterministic Euler in σ-space (diffusers'
EulerDiscreteScheduler) and DDIM with η = 0 are then the same update in two scalings,
    x_{t'} = sqrt(ᾱ_{t'})·x̂0 + sqrt(1 − ᾱ_{t'})·ε̂,
and differ only in their timesteps and their last step: Euler ends at σ = 0 (returns x̂0), DDIM
re-noises to its `final_alpha_cumprod`. The timesteps come from diffusers' schedulers built from
the models' own scheduler configs.

Against diffusers' StableDiffusionPipeline (tests/test_sampling.py): the teacher matches bit for
bit. The student matches to fp32 round-off from the same start, but diffusers' own start differs:
its Euler "trailing" begins at σ_max·noise (init_noise_sigma = σ_max), a UNet input of
sqrt(1 − ᾱ_999)·noise ≈ 0.9977·noise, while the trainer, SD-Turbo's reference sampler and
ComfyUI (noise_scaling with max_denoise) begin at unit noise. Same seeds therefore give slightly
different student images here and in diffusers' default pipeline (about 1e-3 in [0, 1] pixels on
the tiny test models); pass diffusers `latents = noise·sqrt(1 + σ_max²)/σ_max` to line it up.

Returned latents are UNet-space latents (VAE-scaled: what diffusers returns with
output_type="latent"); `decode_latents` turns them into images.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler

from ..errors import EchoDistillError
from ..models.conditioning import Conditioning
from ..models.diffusion import (
    alphas_cumprod_for,
    guided_epsilon_and_x0,
    same_length,
    student_one_step,
    unet_call,
)
from ..models.loading import resolve_dtype
from ..models.pair import ModelPair
from ..models.schedule import predict_epsilon, predict_x0
from .speed import (
    SamplerOptions,
    captured_student,
    check_cuda_graph,
    compiled,
    encoder_state,
    fused_self_attention,
    module_identity,
    prompt_cache,
    to_channels_last,
)


class SamplingError(EchoDistillError, ValueError):
    """A sampling request cannot be served as asked (size, seeds, steps, precision, scheduler)."""


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, 3, H, W) float32 in [0, 1], CPU
    latents: torch.Tensor | None  # (N, 4, h, w) float32 UNet-space latents, CPU; None unless asked for
    seeds: list[int]
    prompts: list[str]


@dataclass(frozen=True)
class Schedule:
    """Where a sampler evaluates the model, and what it re-noises to after each evaluation."""

    timesteps: tuple[int, ...]  # descending, integer DDPM timesteps
    next_alpha_bars: tuple[torch.Tensor | None, ...]  # ᾱ after each step (0-d float32); None: return x̂0


# --- schedules (timesteps from diffusers' schedulers) -------------------------------------------

def _check_alphas(scheduler, alphas_cumprod: torch.Tensor, config: dict) -> None:
    # The trainer's ᾱ table is rebuilt from beta_* only; a config that changes it otherwise
    # (trained_betas, rescale_betas_zero_snr) would sample another model than the one trained.
    if not torch.equal(scheduler.alphas_cumprod.float(), alphas_cumprod.cpu()):
        raise SamplingError(
            "the scheduler config's noise schedule differs from the one training uses "
            f"(trained_betas={config.get('trained_betas')!r}, rescale_betas_zero_snr="
            f"{config.get('rescale_betas_zero_snr')!r}): only beta_start/beta_end/beta_schedule schedules are supported"
        )


def _check_steps(steps: int, config: dict) -> None:
    total = config.get("num_train_timesteps", 1000)
    if not isinstance(steps, int) or not 1 <= steps <= total:
        raise SamplingError(f"steps={steps!r} must be an integer from 1 to {total}", parameters=("steps",))


def euler_trailing_schedule(scheduler_config: dict, steps: int, alphas_cumprod: torch.Tensor) -> Schedule:
    """Euler with "trailing" timesteps: 999 first, then evenly spaced; the last step returns x̂0."""
    _check_steps(steps, scheduler_config)
    scheduler = EulerDiscreteScheduler.from_config(scheduler_config, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    _check_alphas(scheduler, alphas_cumprod, scheduler_config)
    timesteps = scheduler.timesteps.tolist()
    if any(t != round(t) for t in timesteps) or float(scheduler.sigmas[-1]) != 0.0:
        raise SamplingError(
            "the student's scheduler config gives fractional timesteps or a non-zero last sigma "
            "(karras/exponential/beta sigmas, final_sigmas_type); use plain discrete sigmas with final_sigmas_type='zero'"
        )
    timesteps = tuple(int(round(t)) for t in timesteps)
    next_alpha_bars = tuple(alphas_cumprod[t].cpu() for t in timesteps[1:]) + (None,)
    return Schedule(timesteps, next_alpha_bars)


STUDENT_SCHEDULES = ("trailing", "comfyui_turbo")
COMFYUI_TURBO_MAX_STEPS = 10


def comfyui_turbo_schedule(scheduler_config: dict, steps: int, alphas_cumprod: torch.Tensor) -> Schedule:
    """ComfyUI's ``SDTurboScheduler`` at denoise 1: timesteps 999, 899, 799, ... (100 apart, at most
    10), Euler between them, the last step returns x̂0. With ComfyUI's ``euler`` sampler it is the
    same computation (``euler_ancestral`` adds fresh noise at each step and matches only at 1 step)."""
    if not isinstance(steps, int) or not 1 <= steps <= COMFYUI_TURBO_MAX_STEPS:
        raise SamplingError(f"steps={steps!r}: ComfyUI's SD-Turbo schedule has 1 to {COMFYUI_TURBO_MAX_STEPS} steps",
                            parameters=("steps",))
    total = scheduler_config.get("num_train_timesteps", 1000)
    if total != 1000:
        raise SamplingError(f"ComfyUI's SD-Turbo schedule assumes 1000 training timesteps, this model has {total}")
    timesteps = tuple(999 - 100 * i for i in range(steps))
    next_alpha_bars = tuple(alphas_cumprod[t].cpu() for t in timesteps[1:]) + (None,)
    return Schedule(timesteps, next_alpha_bars)


def student_schedule(name: str, scheduler_config: dict, steps: int, alphas_cumprod: torch.Tensor) -> Schedule:
    """The student's timesteps by name: "trailing" (ours, 999/499 at 2 steps) or "comfyui_turbo"."""
    if name == "trailing":
        return euler_trailing_schedule(scheduler_config, steps, alphas_cumprod)
    if name == "comfyui_turbo":
        return comfyui_turbo_schedule(scheduler_config, steps, alphas_cumprod)
    raise SamplingError(f"schedule={name!r} is not one of {', '.join(map(repr, STUDENT_SCHEDULES))}",
                        parameters=("schedule",))


def ddim_schedule(scheduler_config: dict, steps: int, alphas_cumprod: torch.Tensor) -> Schedule:
    """DDIM as diffusers defines it: step t goes to t − T // steps, the last one to final_alpha_cumprod."""
    _check_steps(steps, scheduler_config)
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    _check_alphas(scheduler, alphas_cumprod, scheduler_config)
    timesteps = tuple(int(t) for t in scheduler.timesteps)
    stride = scheduler.config.num_train_timesteps // steps
    final = scheduler.final_alpha_cumprod.float()
    next_alpha_bars = tuple(alphas_cumprod[t - stride].cpu() if t - stride >= 0 else final for t in timesteps)
    return Schedule(timesteps, next_alpha_bars)


# --- shared pieces ------------------------------------------------------------------------------

def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """(N, C, h, w) float32 CPU noise: image i from its own CPU generator seeded with seeds[i]."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


class SizeWarning(UserWarning):
    """An image size the models can draw only badly: far from the size they were trained at."""


def native_size(unet, vae: AutoencoderKL) -> int | None:
    """The side in pixels the UNet was trained at: its latent `sample_size` x the VAE downscale (SD 2.1 base and
    SD-Turbo 512, the 768-v teacher 768, the mini world 64); None when the config does not say."""
    size = getattr(unet.config, "sample_size", None)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size) * 2 ** (len(vae.config.block_out_channels) - 1) if size else None


def native_resolution(pair: ModelPair, part: str = "student") -> int:
    """The image side `part` ("student" or "teacher") of `pair` draws best at: what front ends default to."""
    side = native_size(getattr(pair, part).unet, pair.vae)
    return side if side is not None else 512


def latent_size(unet, vae: AutoencoderKL, width: int, height: int) -> tuple[int, int]:
    """(h, w) of the latents for a `width` x `height` image; both must divide by VAE x UNet downscale.

    A size more than twice the native one or under half of it draws, but warns (SizeWarning): a UNet
    far from its training size draws noise or repeated subjects (the mini world at 512 px: pure noise).
    """
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for SD
    unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)  # 8 for SD: three downsamplings
    multiple = vae_factor * unet_factor
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value <= 0 or value % multiple:
            nearest = max(multiple, round(value / multiple) * multiple) if isinstance(value, (int, float)) else multiple
            raise SamplingError(
                f"{name}={value!r} must be a positive multiple of {multiple} for these models (VAE downscale "
                f"{vae_factor} x UNet downscale {unet_factor}); e.g. {nearest}", parameters=(name,)
            )
    native = native_size(unet, vae)
    if native is not None and not (native / 2 <= min(width, height) and max(width, height) <= native * 2):
        warnings.warn(f"width={width} x height={height} is far from the {native} x {native} these models were "
                      f"trained at: expect noise or repeated subjects; pass width={native} height={native}",
                      SizeWarning, stacklevel=3)
    return height // vae_factor, width // vae_factor


def _check_prompts_and_seeds(prompts: Sequence[str] | str, seeds: Sequence[int] | int) -> tuple[list[str], list[int]]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise SamplingError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if isinstance(seeds, int):
        seeds = [seeds + i for i in range(len(prompts))]  # one int: consecutive seeds, one per prompt
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(prompts):
        raise SamplingError(f"got {len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt, or one int")
    return prompts, seeds


def _precision(pair: ModelPair, dtype: torch.dtype | str | None):
    """Autocast to `dtype` when it is lower than the models' own; None: the models' dtype."""
    if dtype is None:
        return contextlib.nullcontext()
    dtype = resolve_dtype(dtype)
    if dtype == pair.dtype:
        return contextlib.nullcontext()
    if dtype == torch.float32:
        raise SamplingError(f"the models are loaded in {pair.dtype}; fp32 sampling needs a pair loaded in fp32")
    return torch.autocast(pair.device.type, dtype=dtype)


def _encode(pair: ModelPair, prompts: list[str], negative_prompt: str | None, size: tuple[int, int],
            cache: bool = True) -> tuple[Conditioning, Conditioning | None]:
    """(cond (batch N), uncond (batch 1) or None), from at most ONE call per text encoder over the
    distinct prompts; with `cache`, only over those not encoded since the encoders last changed.

    L = 77 up to 75 tokens; a longer prompt is read whole in 77-token windows, as ComfyUI's
    CLIPTextEncode does, and prompts of different lengths are repeated to a common L (which
    leaves cross-attention unchanged). SDXL: each prompt's pooled `text_embeds`, and `time_ids` for
    `size` = (height, width); an empty negative prompt is all zeros where the family's pipeline says
    so (`force_zeros_for_empty_prompt`, as diffusers' StableDiffusionXLPipeline does)."""
    conditioner = pair.conditioner
    unique = list(dict.fromkeys(prompts + ([] if negative_prompt is None else [negative_prompt])))
    if cache:
        state = tuple(encoder_state(t, e) for t, e in zip(pair.tokenizers, pair.text_encoders))
        embeds = prompt_cache(pair.text_encoder).encode(unique, state, conditioner.encode_long)  # U x batch 1
    else:
        embeds = conditioner.encode_long(unique)  # U x Conditioning of batch 1, states (1, 77·k, D)
    row = {p: i for i, p in enumerate(unique)}
    chosen = [embeds[row[p]] for p in prompts] + ([] if negative_prompt is None else [embeds[row[negative_prompt]]])
    states = same_length([c.encoder_hidden_states[0] for c in chosen])  # (N [+ 1], L, D)
    pooled = None if chosen[0].text_embeds is None else torch.cat([c.text_embeds for c in chosen])  # (N [+ 1], P)
    if negative_prompt == "" and conditioner.zeros_for_empty_prompt:
        states[len(prompts):] = 0
        pooled[len(prompts):] = 0
    aligned = conditioner.sized(Conditioning(states, pooled, None if pooled is None else torch.zeros(len(states), 6)),
                                size)
    cond = aligned[: len(prompts)]  # batch N
    uncond = None if negative_prompt is None else aligned[len(prompts):]  # batch 1
    return cond, uncond


def _epsilon_and_x0(unet, latents, timestep: int, cond: Conditioning, uncond: Conditioning | None, guidance: float,
                    alphas_cumprod, prediction_type):
    timesteps = torch.full((latents.shape[0],), timestep, device=latents.device, dtype=torch.long)  # (N,)
    if uncond is not None:
        return guided_epsilon_and_x0(unet, latents, timesteps, cond, uncond, guidance, alphas_cumprod, prediction_type)
    model_output = unet_call(unet, latents, timesteps, cond)  # (N, 4, h, w)
    return (predict_epsilon(model_output, latents, timesteps, alphas_cumprod, prediction_type),
            predict_x0(model_output, latents, timesteps, alphas_cumprod, prediction_type))


def denoise(unet, noise: torch.Tensor, cond: Conditioning | torch.Tensor, uncond: Conditioning | torch.Tensor | None,
            guidance: float, schedule: Schedule, alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Deterministic Euler/DDIM from `noise` (the model input at the first timestep) to x0 latents.

    `cond` (batch N) and `uncond` (batch 1, or None without guidance) are `Conditioning`s (any family)
    or SD 1.x / 2.x prompt-state tensors (N, L, D).

    The schedule moves to the device once, before the loop: inside it nothing is copied between
    host and device and nothing is read back, so the host only queues work.
    """
    finals = [a is None for a in schedule.next_alpha_bars]
    next_alpha_bars = torch.stack([torch.zeros(()) if a is None else a for a in schedule.next_alpha_bars])
    next_alpha_bars = next_alpha_bars.to(noise.device)  # (S,): the one host-to-device copy
    latents = noise  # (N, 4, h, w)
    for index, timestep in enumerate(schedule.timesteps):
        eps, x0 = _epsilon_and_x0(unet, latents, timestep, cond, uncond, guidance, alphas_cumprod, prediction_type)
        if finals[index]:
            return x0
        next_alpha_bar = next_alpha_bars[index]
        latents = next_alpha_bar.sqrt() * x0 + (1 - next_alpha_bar).sqrt() * eps  # (N, 4, h, w)
    return latents


DECODE_SLICE = 4  # images per VAE decode call: a batch of 16 at 512 px would otherwise peak at ~10 GB


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) float32 in [0, 1] on the CPU from UNet-space latents (N, 4, h, w), in slices."""
    scaled = (latents.float() / vae.config.scaling_factor).to(vae.device, vae.dtype)  # divide in fp32, then cast
    images = torch.cat([vae.decode(chunk).sample.float().cpu() for chunk in scaled.split(DECODE_SLICE)])
    return (images * 0.5 + 0.5).clamp(0, 1)  # (N, 3, H, W)


def _result(pair: ModelPair, latents: torch.Tensor, seeds, prompts, return_latents: bool) -> SampleResult:
    images = decode_latents(pair.vae, latents)
    return SampleResult(images, latents.float().cpu() if return_latents else None, seeds, prompts)


# --- the samplers -------------------------------------------------------------------------------

@torch.no_grad()
def sample_student(
    pair: ModelPair, prompts: list[str], *, seeds: list[int] | int, steps: int = 1, width: int = 512,
    height: int = 512, dtype: torch.dtype | str | None = None, guidance: float = 0.0, return_latents: bool = True,
    options: SamplerOptions | None = None, schedule: str = "trailing",
) -> SampleResult:
    """The student's images: one step at t = 999 (steps = 1), or Euler for 2–4 steps.

    `schedule` picks the timesteps of several steps: "trailing" (999/499, 999/666/333, ...: what
    training previews use) or "comfyui_turbo" (999/899/799/...: ComfyUI's SDTurboScheduler, so an
    exported concept in core nodes with the euler sampler gives the same picture). One step is
    t = 999 in both.

    guidance > 1 adds classifier-free guidance against the empty prompt (as diffusers does);
    the default 0 is how SD-Turbo is meant to run. `dtype` autocasts the models to a lower
    precision (e.g. "bf16"); None runs them in the dtype they were loaded in. An int `seeds`
    gives consecutive seeds seeds, seeds + 1, ... `options` switches speed features on
    (see `SamplerOptions`); the default caches prompt embeddings and nothing else.
    """
    options = options or SamplerOptions()
    prompts, seeds = _check_prompts_and_seeds(prompts, seeds)
    student, device = pair.student, pair.device
    guided = guidance > 1.0
    if options.cuda_graph:
        if pair.is_sdxl:
            raise SamplingError("cuda_graph=True captures SD 1.x / 2.x students only; sample SDXL without it",
                                parameters=("cuda_graph",))
        check_cuda_graph(device, steps, guided)
    h, w = latent_size(student.unet, pair.vae, width, height)
    alphas_cumprod = alphas_cumprod_for(student.scheduler_config, device)  # (T,)
    schedule = student_schedule(schedule, student.scheduler_config, steps, alphas_cumprod)
    noise = initial_noise(seeds, (student.unet.config.in_channels, h, w)).to(device)  # (N, 4, h, w)
    with _precision(pair, dtype), _speedups(pair, student.unet, options) as unet:
        noise = noise.contiguous(memory_format=torch.channels_last) if options.channels_last else noise
        cond, uncond = _encode(pair, prompts, "" if guided else None, (height, width), options.cache_prompts)
        if steps == 1 and not guided:
            # Exactly the trainer's student generation, so previews and training see one model.
            def one_step(noise: torch.Tensor, cond) -> torch.Tensor:
                return student_one_step(unet, noise, cond, alphas_cumprod, student.prediction_type,
                                        schedule.timesteps[0])

            if options.cuda_graph:
                states = cond.encoder_hidden_states  # SD 1.x / 2.x only (checked above): a tensor to capture
                key = (tuple(noise.shape), tuple(states.shape), states.dtype, torch.get_autocast_dtype("cuda"),
                       torch.is_autocast_enabled("cuda"), schedule.timesteps[0], module_identity(unet))
                latents = captured_student(unet, key, one_step, noise, states)(noise, states).clone()
            else:
                latents = one_step(noise, cond)
        else:
            latents = denoise(unet, noise, cond, uncond, guidance, schedule, alphas_cumprod,
                              student.prediction_type)
        return _result(pair, latents, seeds, prompts, return_latents)


@contextlib.contextmanager
def _speedups(pair: ModelPair, unet, options: SamplerOptions):
    """The UNet to call under `options`: channels-last, fused self-attention, compiled."""
    if options.channels_last:
        to_channels_last(unet, pair.vae)
    with fused_self_attention(unet) if options.fuse_qkv else contextlib.nullcontext():
        yield compiled(unet, options.compile_backend, options.compile_mode) if options.compile else unet


@torch.no_grad()
def sample_teacher(
    pair: ModelPair, prompts: list[str], *, seeds: list[int] | int, steps: int = 25, guidance: float = 7.5,
    negative_prompt: str = "", width: int = 512, height: int = 512, dtype: torch.dtype | str | None = None,
    return_latents: bool = True, options: SamplerOptions | None = None,
) -> SampleResult:
    """The teacher's images: DDIM (η = 0) from its own scheduler config, CFG when guidance > 1.

    The teacher's parameterization (ε or v) is read from its config. Seeds, `dtype` and the
    result are as for `sample_student`; the SD 2.1 768-v teacher wants width = height = 768. SDXL
    teachers are sampled the same way (DDIM from their own scheduler config), with their added
    size conditioning for width x height and, for the empty negative prompt, SDXL's zero conditioning.
    `options` as for `sample_student`, except cuda_graph (one-step student only).
    """
    options = options or SamplerOptions()
    prompts, seeds = _check_prompts_and_seeds(prompts, seeds)
    teacher, device = pair.teacher, pair.device
    if options.cuda_graph:
        raise SamplingError("cuda_graph=True captures the one-step student only; the teacher samples in many steps")
    h, w = latent_size(teacher.unet, pair.vae, width, height)
    alphas_cumprod = alphas_cumprod_for(teacher.scheduler_config, device)  # (T,)
    schedule = ddim_schedule(teacher.scheduler_config, steps, alphas_cumprod)
    noise = initial_noise(seeds, (teacher.unet.config.in_channels, h, w)).to(device)  # (N, 4, h, w)
    with _precision(pair, dtype), _speedups(pair, teacher.unet, options) as unet:
        noise = noise.contiguous(memory_format=torch.channels_last) if options.channels_last else noise
        cond, uncond = _encode(pair, prompts, negative_prompt if guidance > 1.0 else None, (height, width),
                               options.cache_prompts)
        latents = denoise(unet, noise, cond, uncond, guidance, schedule, alphas_cumprod, teacher.prediction_type)
        return _result(pair, latents, seeds, prompts, return_latents)


SAMPLERS: dict[str, Callable[..., SampleResult]] = {"student": sample_student, "teacher": sample_teacher}


def get_sampler(name: str) -> Callable[..., SampleResult]:
    if name not in SAMPLERS:
        raise SamplingError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
