# Whole on purpose (~415 lines): the three stages (VAE, text encoder + teacher, student) share their batch,
# logging, checkpoint and resume helpers, and scripts/train_miniworld.py runs them as one recipe.
"""Training the mini world's base models from scratch: VAE, then text encoder + teacher, then student.

Each stage is one function whose loop reads top to bottom (draw a batch → forward → loss →
backward → clip → step → log). Everything random comes from generators seeded by the caller,
so one seed gives the same models (on the same torch build and thread count).

Every stage takes a `device` ("cpu" or "cuda"): its inputs may live anywhere, it trains there,
and it returns its models and tensors on the CPU, so the stages chain without knowing where the
others ran. Random numbers are always drawn on the CPU and then moved, so a run on a GPU draws
the same batches, noise and timesteps as one on a CPU, and a loop checkpoint saved on one
resumes on the other.

Student distillation ("knowledge distillation" in the sense of Luhman & Luhman, 2021): the
teacher turns N fixed (noise, prompt) pairs into images with guided DDIM; the student starts as
a copy of the teacher and learns to map the same noise to the same image in ONE evaluation at
t = 999, with `echodistill.models.diffusion.student_one_step` — exactly the call the trainer and the
samplers make. It is plain regression, so it needs no discriminator and cannot collapse; its
cost is the teacher's sampling of the pairs, paid once.
"""

from __future__ import annotations

import copy
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from ..files import atomic_write_bytes
from ..models.diffusion import alphas_cumprod_for, student_one_step
from ..models.schedule import add_noise, denoising_target
from ..sampling.samplers import ddim_schedule, denoise
from .architecture import TEXT_WIDTH, build_text_encoder, build_unet, build_vae
from .grammar import ATTRIBUTES, Caption
from .procedural import ALL_COLORS, DECORATIONS, PATTERN_WORDS

# What the text encoder's pretraining heads read from a caption: the oracle's attributes (a procedural
# subject's body may take any colour, so "color" covers them all), its pattern word ("a red striped ring"),
# and its first decoration with that decoration's colour ("... ring with a blue cross").
TEXT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    **ATTRIBUTES,
    "color": tuple(dict.fromkeys([*ATTRIBUTES["color"], *ALL_COLORS])),
    "pattern": tuple(PATTERN_WORDS.values()),
    "decoration": DECORATIONS,
    "decoration_color": tuple(ALL_COLORS),
}

Log = Callable[[str], None]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine to zero: the last steps average out SGD noise like an EMA would."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(groups: list[dict], total: int, warmup: int):
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.99), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    return optimizer, scheduler


class Meter:
    """Running means of logged terms between two log lines, and the time per step."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.start = time.time()

    def add(self, **terms: float) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.count += 1

    def line(self, step: int, total: int) -> str:
        means = " ".join(f"{k} {v / max(1, self.count):.4f}" for k, v in self.sums.items())
        per_step = (time.time() - self.start) / max(1, self.count)
        self.__init__()
        return f"step {step}/{total} {means} ({per_step:.2f} s/step)"


def save_atomically(path: Path, payload: dict) -> None:
    """torch.save through a temporary file (files.atomic_write_bytes): a run killed mid-write leaves the previous
    file intact. Serialized in memory first, so that a full disk is named as such (OutputWriteError with the
    path), not as torch's writer error."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.with_name(f".{path.name}.tmp").unlink(missing_ok=True)  # the temporary name of earlier versions
    atomic_write_bytes(path, buffer.getvalue())


def save_loop_state(path: Path, step: int, modules: dict[str, torch.nn.Module], optimizer, scheduler,
                    generator: torch.Generator) -> None:
    """Everything a training loop needs to go on after `step`: weights, optimizer, schedule, random generator."""
    save_atomically(path, {"step": step, **{name: m.state_dict() for name, m in modules.items()},
                           "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                           "generator": generator.get_state()})


def restore_loop_state(path: Path | None, modules: dict[str, torch.nn.Module], optimizer, scheduler,
                       generator: torch.Generator, log: Log, stage: str, total: int) -> int:
    """The first step to run: 1, or the step after the one saved at `path` (whose state is loaded in place)."""
    if path is None or not path.is_file():
        return 1
    state = torch.load(path, map_location="cpu", weights_only=True)  # load_state_dict copies to each module's device
    for name, module in modules.items():
        module.load_state_dict(state[name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    log(f"{stage} resumed from {path} at step {state['step']}/{total}")
    return state["step"] + 1


def min_snr_loss(prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, snr: torch.Tensor,
                 gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-SNR-weighted ε-MSE (Hang et al., 2023), and the unweighted per-sample MSE (B,) for the log."""
    per_sample = (prediction - target).pow(2).mean(dim=(1, 2, 3))  # (B,)
    weight = snr[timesteps].clamp(max=gamma) / snr[timesteps]  # ε-prediction form
    return (weight * per_sample).mean(), per_sample


def _batch_indices(count: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, count, (batch,), generator=generator)


def _to_signed(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (B, 64, 64, 3) -> float32 (B, 3, 64, 64) in [-1, 1] on `device`."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# --- stage 1: VAE -------------------------------------------------------------------------------

@dataclass(frozen=True)
class VaeSettings:
    steps: int = 2200
    batch: int = 32
    crop: int = 32  # most steps see random crops: a 32×32 crop costs a quarter of a full picture
    full_steps: int = 200  # the last steps see whole pictures, so the 16×16 mid-block attention is trained too
    lr: float = 2e-3
    kl_weight: float = 1e-6  # SD's: the latents stay detailed; their scale is fixed afterwards
    warmup: int = 50
    checkpoint_every: int = 200


def _crops(images: np.ndarray, size: int, generator: torch.Generator) -> np.ndarray:
    """One random size×size window per picture, on the 4-pixel grid of the latents."""
    cells = (images.shape[1] - size) // 4 + 1
    offsets = (torch.randint(0, cells, (len(images), 2), generator=generator) * 4).tolist()
    return np.stack([image[top : top + size, left : left + size] for image, (top, left) in zip(images, offsets)])


def train_vae(images: np.ndarray, settings: VaeSettings, seed: int, log: Log,
              resume_path: Path | None = None, device: torch.device | str = "cpu") -> AutoencoderKL:
    """AutoencoderKL on rendered scenes with L1 + MSE reconstruction and a tiny KL term.

    The VAE is fully convolutional (plus one attention layer in the middle), so it learns
    local reconstruction from crops at a quarter of the cost, and finishes on whole pictures.
    With `resume_path`, the loop state is saved there every `settings.checkpoint_every` steps and
    picked up from it, as train_teacher does.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    vae = build_vae().to(device).train()
    optimizer, scheduler = make_optimizer([{"params": vae.parameters(), "lr": settings.lr, "weight_decay": 0.0}],
                                          settings.steps, settings.warmup)
    first = restore_loop_state(resume_path, {"vae": vae}, optimizer, scheduler, generator, log, "vae", settings.steps)
    meter = Meter()
    for step in range(first, settings.steps + 1):
        batch = images[_batch_indices(len(images), settings.batch, generator).numpy()]
        if step <= settings.steps - settings.full_steps:
            batch = _crops(batch, settings.crop, generator)
        pixels = _to_signed(batch, device)  # (B, 3, s, s)
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.sample(generator)  # (B, 4, s/4, s/4); drawn on the CPU generator, then moved
        reconstruction = vae.decode(latents).sample  # (B, 3, s, s)
        l1 = (reconstruction - pixels).abs().mean()
        mse = (reconstruction - pixels).pow(2).mean()
        kl = posterior.kl().mean()  # summed over latent elements, as SD's VAE loss
        loss = l1 + mse + settings.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        meter.add(loss=loss.item(), l1=l1.item(), kl=kl.item())
        if step % 50 == 0 or step == settings.steps:
            log(f"vae {meter.line(step, settings.steps)}")
        if resume_path is not None and step % settings.checkpoint_every == 0 and step < settings.steps:
            save_loop_state(resume_path, step, {"vae": vae}, optimizer, scheduler, generator)
    return vae.cpu().eval()


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, batch: int = 256,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Posterior means (N, 4, 16, 16), unscaled, on the CPU; encoded on `device` by a copy of `vae`."""
    encoder = copy.deepcopy(vae).to(device)
    parts = [encoder.encode(_to_signed(images[i : i + batch], device)).latent_dist.mean.cpu()
             for i in range(0, len(images), batch)]
    return torch.cat(parts)


def set_scaling_factor(vae: AutoencoderKL, latents: torch.Tensor) -> float:
    """Choose the VAE's scaling factor so that the UNet sees unit-variance latents (SD's 0.18215 rule)."""
    factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=factor)
    return factor


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: np.ndarray) -> float:
    pixels = _to_signed(images)
    reconstruction = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((reconstruction - pixels) / 2).pow(2).mean()
    return float(10 * torch.log10(1.0 / mse))


# --- stage 2: text encoder pretraining, then text encoder + teacher UNet jointly ----------------

@dataclass(frozen=True)
class TextSettings:
    steps: int = 500
    batch: int = 128
    lr: float = 2e-3
    warmup: int = 50
    head_scale: float = 1.0  # logits = scale · <unit class direction, pooled state>: see pretrain_text_encoder


def stated_labels(captions: list[Caption]) -> dict[str, torch.Tensor]:
    """{attribute: (N,) index of the stated word, or len(choices) where the caption leaves it out}."""
    return {
        name: torch.tensor([choices.index(c.stated[name]) if name in c.stated else len(choices) for c in captions])
        for name, choices in TEXT_ATTRIBUTES.items()
    }


def pretrain_text_encoder(
    token_ids: torch.Tensor, labels: dict[str, torch.Tensor], settings: TextSettings, seed: int, log: Log,
    device: torch.device | str = "cpu",
) -> CLIPTextModel:
    """Teach the encoder what captions state before any UNet reads it: the role CLIP pretraining plays for SD.

    Without it, the jointly trained UNet's cross-attention stays nearly uniform over the 77
    positions (measured: ~65% of its weight on the padding), so it reads the mean of the token
    states; a fresh encoder puts the first words' meaning there and the UNet never learned the
    background or the position (no loss difference between right and wrong background words
    after 2000 steps). Here heads read every attribute from exactly that mean, so from the first
    teacher step the mean says what the caption asks for. The heads are dropped.

    The heads' class directions are unit vectors and their scale is small and fixed: with free
    linear heads the encoder got away with captions that differ by a sliver (measured: mean states
    of captions that differ only in the position word at cosine 0.9992, in the shape word 0.991),
    which large head weights could still tell apart but a UNet's cross-attention could not. A
    confident prediction through a bounded head needs the states themselves to differ by a
    margin of several units along each attribute's directions.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 5)
    text_encoder = build_text_encoder().train()
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(TEXT_WIDTH, len(c) + 1) for name, c in TEXT_ATTRIBUTES.items()})
    text_encoder.to(device)
    heads.to(device)
    token_ids, labels = token_ids.to(device), {name: value.to(device) for name, value in labels.items()}

    def logits(head: torch.nn.Linear, pooled: torch.Tensor) -> torch.Tensor:
        return settings.head_scale * pooled @ F.normalize(head.weight, dim=1).T + head.bias
    params = list(text_encoder.parameters()) + list(heads.parameters())
    optimizer, scheduler = make_optimizer([{"params": params, "lr": settings.lr, "weight_decay": 0.0}],
                                          settings.steps, settings.warmup)
    meter = Meter()
    for step in range(1, settings.steps + 1):
        index = _batch_indices(len(token_ids), settings.batch, generator).to(device)
        pooled = text_encoder(token_ids[index]).last_hidden_state.mean(dim=1)  # (B, D)
        losses = {name: F.cross_entropy(logits(head, pooled), labels[name][index]) for name, head in heads.items()}
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        meter.add(loss=loss.item())
        if step % 100 == 0 or step == settings.steps:
            log(f"text {meter.line(step, settings.steps)}")
    return text_encoder.cpu().eval()


# --- text encoder + teacher UNet, jointly -----------------------------------------------------

@dataclass(frozen=True)
class TeacherSettings:
    steps: int = 4000
    batch: int = 64
    lr: float = 5e-4
    text_lr: float = 5e-4
    caption_dropout: float = 0.1  # empty prompts, so classifier-free guidance has an unconditional model
    offset_noise: float = 0.35  # weight of per-channel constant noise (see structured_noise)
    coarse_noise: float = 0.35  # weight of 4×4 noise, upsampled
    min_snr_gamma: float = 5.0  # Min-SNR weighting (Hang et al., 2023): faster convergence than plain ε-MSE
    warmup: int = 200
    checkpoint_every: int = 100


def structured_noise(shape: torch.Size, generator: torch.Generator, offset: float, coarse: float) -> torch.Tensor:
    """Unit-variance training noise with extra energy at the lowest frequencies ("offset noise").

    SD's schedule never destroys a picture completely (ᾱ_999 ≈ 0.005), and on a 16×16 latent
    the surviving mean colour and coarse layout are easy to read from x_t: plain Gaussian noise
    averages out over only 256 cells. A UNet trained on it takes the background and the object's
    place from the noise instead of the caption (measured on a first run: no loss difference
    between right and wrong background words), and samples a random background from pure noise.
    Corrupting the mean (offset) and the 4×4 layout (coarse) at training time removes that
    shortcut; sampling still starts from plain unit noise, as in SD fine-tunes with offset noise.
    """
    batch, channels, height, width = shape
    white = torch.randn(shape, generator=generator)
    mean = torch.randn((batch, channels, 1, 1), generator=generator)
    layout = F.interpolate(torch.randn((batch, channels, 4, 4), generator=generator), size=(height, width),
                           mode="bilinear", align_corners=False)
    layout = layout / layout.std()  # bilinear upsampling shrinks the variance; restore it
    return (white + offset * mean + coarse * layout) / math.sqrt(1 + offset**2 + coarse**2)


def teacher_optimizer(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, settings: TeacherSettings):
    """The teacher loop's AdamW and its warm-up + cosine schedule (the text encoder trains only at text_lr > 0)."""
    groups = [{"params": list(unet.parameters()), "lr": settings.lr, "weight_decay": 1e-2}]
    if settings.text_lr > 0:  # no decay on the text encoder: the ~49k unused token rows would shrink for nothing
        groups.append({"params": list(text_encoder.parameters()), "lr": settings.text_lr, "weight_decay": 0.0})
    return make_optimizer(groups, settings.steps, settings.warmup)


def train_teacher(
    latents: torch.Tensor,
    token_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    scheduler_config: dict,
    settings: TeacherSettings,
    seed: int,
    log: Log,
    text_encoder: CLIPTextModel | None = None,
    resume_path: Path | None = None,
    device: torch.device | str = "cpu",
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """ε-prediction denoising on scaled latents (N, 4, 16, 16) with captions `token_ids` (N, 77).

    `text_encoder` (pretrained, see pretrain_text_encoder) is trained on; None starts a fresh one.
    With `resume_path`, the whole loop state (weights, optimizer, schedule, random generator) is
    saved there every `settings.checkpoint_every` steps and picked up from it when it exists, so a
    run cut off (a session ending, Ctrl-C) continues where it stopped and ends as an uncut run would.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    unet = build_unet().to(device).train()
    text_encoder = (build_text_encoder() if text_encoder is None else text_encoder).to(device)
    latents, token_ids, empty_ids = latents.to(device), token_ids.to(device), empty_ids.to(device)
    frozen_text = settings.text_lr == 0  # as SD trains on a frozen, pretrained CLIP text encoder
    text_encoder.train(not frozen_text).requires_grad_(not frozen_text)
    alphas_cumprod = alphas_cumprod_for(scheduler_config).to(device)  # (T,)
    snr = alphas_cumprod / (1 - alphas_cumprod)  # (T,)
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    optimizer, scheduler = teacher_optimizer(unet, text_encoder, settings)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    modules = {"unet": unet, "text_encoder": text_encoder}
    first = restore_loop_state(resume_path, modules, optimizer, scheduler, generator, log, "teacher", settings.steps)
    meter = Meter()
    for step in range(first, settings.steps + 1):
        index = _batch_indices(len(latents), settings.batch, generator).to(device)
        clean = latents[index]  # (B, 4, 16, 16)
        ids = token_ids[index].clone()  # (B, 77)
        dropped = (torch.rand(settings.batch, generator=generator) < settings.caption_dropout).to(device)
        ids[dropped] = empty_ids
        noise = structured_noise(clean.shape, generator, settings.offset_noise, settings.coarse_noise).to(device)
        timesteps = torch.randint(0, len(alphas_cumprod), (settings.batch,), generator=generator).to(device)
        noisy = add_noise(clean, noise, timesteps, alphas_cumprod)
        with torch.set_grad_enabled(not frozen_text):
            encoder_hidden_states = text_encoder(ids).last_hidden_state  # (B, 77, D)
        prediction = unet(noisy, timesteps, encoder_hidden_states=encoder_hidden_states).sample
        target = denoising_target(clean, noise, timesteps, alphas_cumprod, prediction_type)
        loss, per_sample = min_snr_loss(prediction, target, timesteps, snr, settings.min_snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        meter.add(loss=loss.item(), mse=per_sample.mean().item())
        if step % 50 == 0 or step == settings.steps:
            log(f"teacher {meter.line(step, settings.steps)}")
        if resume_path is not None and step % settings.checkpoint_every == 0 and step < settings.steps:
            save_loop_state(resume_path, step, modules, optimizer, scheduler, generator)
    return unet.cpu().eval(), text_encoder.cpu().eval()


# --- stage 3: student, distilled from the teacher -----------------------------------------------

@dataclass(frozen=True)
class StudentSettings:
    pairs: int = 6144
    pair_steps: int = 10  # DDIM steps of the teacher per pair
    pair_guidance: float = 4.0
    pair_batch: int = 128
    steps: int = 1500
    batch: int = 64
    lr: float = 1e-4
    warmup: int = 100
    checkpoint_every: int = 100  # distillation steps between loop checkpoints (the pairs are kept per batch)


@torch.no_grad()
def teacher_pairs(
    unet: UNet2DConditionModel,
    encoder_hidden_states: torch.Tensor,
    uncond: torch.Tensor,
    noise: torch.Tensor,
    scheduler_config: dict,
    settings: StudentSettings,
    log: Log,
    device: torch.device | str = "cpu",
    resume_path: Path | None = None,
) -> torch.Tensor:
    """The teacher's guided DDIM images (N, 4, 16, 16), on the CPU, from `noise` under prompts (N, 77, D).

    With `resume_path`, the images made so far are saved there after every batch of
    `settings.pair_batch`, and a later call with the same inputs goes on from them; a file made from
    other inputs or settings (another teacher's is removed by the script) is started over.
    """
    unet = copy.deepcopy(unet).to(device)
    uncond = uncond.to(device)
    alphas_cumprod = alphas_cumprod_for(scheduler_config).to(device)
    schedule = ddim_schedule(scheduler_config, settings.pair_steps, alphas_cumprod)
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    inputs = _pairs_fingerprint(noise, encoder_hidden_states, uncond, settings)
    targets = _restore_pairs(resume_path, inputs, log)
    start, first = time.time(), sum(len(t) for t in targets)
    for i in range(first, len(noise), settings.pair_batch):
        sl = slice(i, i + settings.pair_batch)
        targets.append(denoise(unet, noise[sl].to(device), encoder_hidden_states[sl].to(device), uncond,
                               settings.pair_guidance, schedule, alphas_cumprod, prediction_type).cpu())
        done = min(i + settings.pair_batch, len(noise))
        if resume_path is not None and done < len(noise):
            save_atomically(resume_path, {"inputs": inputs, "targets": torch.cat(targets)})
        log(f"pairs {done}/{len(noise)} ({time.time() - start:.0f} s)")
    return torch.cat(targets)


def _pairs_fingerprint(noise: torch.Tensor, encoder_hidden_states: torch.Tensor, uncond: torch.Tensor,
                       settings: StudentSettings) -> torch.Tensor:
    """Numbers that change when the pairs' inputs or settings do: counts, settings and input sums (float64)."""
    sums = [t.detach().double().cpu().sum() for t in (noise, noise.abs(), encoder_hidden_states, uncond)]
    return torch.tensor([len(noise), settings.pair_steps, settings.pair_guidance, settings.pair_batch, *sums],
                        dtype=torch.float64)


def _restore_pairs(path: Path | None, inputs: torch.Tensor, log: Log) -> list[torch.Tensor]:
    if path is None or not path.is_file():
        return []
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["inputs"].shape != inputs.shape or not torch.allclose(state["inputs"], inputs, rtol=1e-9, atol=0):
        log(f"pairs in {path} were made from other inputs or settings: starting over")
        return []
    log(f"pairs resumed from {path} at {len(state['targets'])}/{int(inputs[0])}")
    return [state["targets"]]


def distill_student(
    teacher: UNet2DConditionModel,
    noise: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    targets: torch.Tensor,
    scheduler_config: dict,
    settings: StudentSettings,
    seed: int,
    log: Log,
    device: torch.device | str = "cpu",
    resume_path: Path | None = None,
) -> UNet2DConditionModel:
    """A copy of the teacher trained so that ONE step at t = 999 from `noise` lands on `targets`.

    With `resume_path`, the loop state is saved there every `settings.checkpoint_every` steps and
    picked up from it when it exists, as the teacher's is."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 2)
    student = copy.deepcopy(teacher).to(device).train().requires_grad_(True)
    noise, encoder_hidden_states, targets = noise.to(device), encoder_hidden_states.to(device), targets.to(device)
    alphas_cumprod = alphas_cumprod_for(scheduler_config).to(device)
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    optimizer, scheduler = make_optimizer([{"params": student.parameters(), "lr": settings.lr, "weight_decay": 1e-2}],
                                      settings.steps, settings.warmup)
    modules = {"student": student}
    first = restore_loop_state(resume_path, modules, optimizer, scheduler, generator, log, "student", settings.steps)
    meter = Meter()
    for step in range(first, settings.steps + 1):
        index = _batch_indices(len(noise), settings.batch, generator).to(device)
        latents = student_one_step(student, noise[index], encoder_hidden_states[index], alphas_cumprod,
                                   prediction_type)  # (B, 4, 16, 16)
        loss = F.mse_loss(latents, targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        meter.add(loss=loss.item())
        if step % 50 == 0 or step == settings.steps:
            log(f"student {meter.line(step, settings.steps)}")
        if resume_path is not None and step % settings.checkpoint_every == 0 and step < settings.steps:
            save_loop_state(resume_path, step, modules, optimizer, scheduler, generator)
    return student.cpu().eval().requires_grad_(False)
