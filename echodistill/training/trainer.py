# Whole on purpose (~530 lines): train_step reads top to bottom and the helpers around it are the words it is
# written in; splitting them off would hide the step. Checkpoints, previews and callbacks have their own modules.
"""The EchoDistill trainer: teacher and one-step student trained together through one text encoder.

One iteration (`train_step`) reads top to bottom, in the order of DESIGN §1:
  1. teacher step   masked denoising loss on real images (+ echoed samples); teacher K/V + token row
  2. student        z_s = one step from noise at t=999, prompt embeddings detached
  3. target         z_s re-noised to a random t (same noise), teacher x0 with CFG, no grad
  4. student step   adversarial (ensemble) + ᾱ_t·(latent MSE, semantic cosine, MS-SWD); student K/V only
  5. heads step     ½[CE(D(x_real), real) + CE(D(sg[x_s]), fake)] for every discriminator head
  6. echo           (scheduled) the student's best generations join the teacher's data
Ablations switch parts off: `schedule="sequential"` runs step 1 alone for the first half of the
steps and 2-5 alone after it; `weight_adversarial=0` drops the adversarial term and step 5;
`shared_text_encoder=False` gives the student a token row of its own, trained in step 4.
Every family runs this one loop: prompts become a `Conditioning` through `pair.conditioner` (for
SDXL: both text encoders' states, the pooled text and the size ids), and the token has a row in
each shared text encoder (SDXL: two), all trained by the teacher's loss.
Randomness comes only from the trainer's own generators, so a run resumed from a checkpoint on
the CPU reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from ..concepts.bundle import ConceptBundle
from ..errors import OutputWriteError
from ..files import check_writable, exclusive_output
from ..models.adapters import adapter_state_dict, add_adapter
from ..models.concept import (
    ConceptEmbedding,
    add_concept_tokens,
    concept_rows,
    own_concept_embeddings,
    reading_with_all,
)
from ..models.conditioning import Conditioning
from ..models.diffusion import alphas_cumprod_for, student_one_step, teacher_target, unet_call
from ..models.pair import ModelPair
from ..models.schedule import add_noise, denoising_target
from .callbacks import Callbacks, TrainingCancelled, TrainingDiverged
from .checkpointing import TrainingCheckpoint, checkpoint_path, data_identity
from .config import TrainConfig
from .data import ConceptDataset, ConceptImage
from .threads import configure_cpu_threads
from .discriminators import build_ensemble
from .echo import EchoBuffer, echo_prompt, select_best
from .losses import (
    alpha_bar_weight,
    discriminator_loss,
    generator_adversarial_loss,
    latent_mse,
    masked_denoising_loss,
    ms_swd,
    real_probability,
    semantic_cosine_distance,
)
from .offload import Offloader
from .previews import preview_images


class Trainer:
    def __init__(
        self,
        pair: ModelPair,
        images: list[ConceptImage],
        config: TrainConfig,
        *,
        backbone_paths: dict[str, str | os.PathLike] | None = None,
        ip_adapter_path: str | os.PathLike | None = None,
        run_dir: str | os.PathLike | None = None,
        callbacks: Callbacks | None = None,
    ):
        self.pair, self.config = pair, config
        self.callbacks = callbacks or Callbacks()
        self.run_dir = Path(run_dir) if run_dir else None
        self.device = pair.device
        # CPU: threads per model size (one for small models), unless the user chose (see training.threads).
        self.cpu_threads = configure_cpu_threads(pair.student.unet, self.device)
        torch.manual_seed(config.seed)  # adapter and head initialisation
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.noise_generator = torch.Generator().manual_seed(config.seed + 1)

        self.data_identity = data_identity(images)
        # One ConceptToken per shared text encoder (SDXL: CLIP ViT-L, then OpenCLIP ViT-bigG).
        self.concepts = add_concept_tokens(pair.tokenizers, pair.text_encoders, config.token, config.initializer_word)
        self.concept = self.concepts[0]
        self.image_size = (config.resolution, config.resolution)  # SDXL's size conditioning: uncropped, as trained
        self.dataset = ConceptDataset.from_config(images, config, pair.vae_downscale)
        teacher_params = add_adapter(pair.teacher.unet, config)
        student_params = add_adapter(pair.student.unet, config)
        # No shared encoder (ablation): the student reads the prompts with its own token row(s), trained by its losses.
        self.student_rows = None if config.shared_text_encoder else own_concept_embeddings(pair.text_encoders)
        if config.gradient_checkpointing:
            pair.teacher.unet.enable_gradient_checkpointing()
            pair.student.unet.enable_gradient_checkpointing()
            pair.vae.enable_gradient_checkpointing()  # the pixel losses' decode: the largest activations at 512 px
        paths = backbone_paths or {}
        members = [(name, paths.get(name)) for name in config.discriminators]
        self.ensemble = build_ensemble(
            members,
            teacher_unet=pair.teacher.unet,
            ip_adapter_path=ip_adapter_path,
            dtype=pair.dtype,
            device=self.device,
        )
        self.clip_member = self.ensemble.members["clip_vit_h14"] if "clip_vit_h14" in self.ensemble.members else None
        backbones = {name: member.backbone for name, member in self.ensemble.members.items() if member.inputs == "images"}
        encoders = {"text_encoder": pair.text_encoder, **({} if pair.text_encoder_2 is None else
                                                          {"text_encoder_2": pair.text_encoder_2})}
        self.offloader = Offloader({**encoders, "vae": pair.vae, **backbones}, self.device, enabled=config.offload)
        self.encoder_names = tuple(encoders)
        self.backbone_names = tuple(backbones)
        self.reference_posteriors = self._encode_references() if config.cache_latents else None
        self.reference_anchor: torch.Tensor | None = None  # mean backbone embedding of the references, made once

        adamw = dict(
            betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon, weight_decay=config.weight_decay,
            fused=self.device.type == "cuda",  # one kernel per step instead of one per tensor
        )
        self.teacher_optimizer = torch.optim.AdamW(
            config.parameter_groups(teacher_params, concept_rows(pair.text_encoders), config.lr_teacher), **adamw
        )
        own_rows = [] if self.student_rows is None else [row.concept_row for row in self.student_rows]
        self.student_optimizer = torch.optim.AdamW(
            config.parameter_groups(student_params, own_rows, config.lr_student), **adamw
        )
        self.heads_optimizer = torch.optim.AdamW(self.ensemble.heads_parameters(), lr=config.lr_heads, **adamw)
        fp16 = config.mixed_precision == "fp16"
        self.scalers = {
            id(optimizer): torch.amp.GradScaler(self.device.type, enabled=fp16)
            for optimizer in (self.teacher_optimizer, self.student_optimizer, self.heads_optimizer)
        }

        self.teacher_abar = alphas_cumprod_for(pair.teacher.scheduler_config, self.device)
        self.student_abar = alphas_cumprod_for(pair.student.scheduler_config, self.device)
        with torch.no_grad():  # batch 1, no concept in it; SDXL: zero conditioning, as its pipelines use for ""
            self.uncond = pair.conditioner.negative("", self.image_size)
        self.echo = EchoBuffer(config.echo_buffer_size)
        self.step = 0
        self.last_checkpoint: Path | None = None
        self._last_saved_step: int | None = None

    @property
    def student_row(self) -> ConceptEmbedding | None:
        """The student's own row in the first text encoder (shared_text_encoder=False), else None."""
        return None if self.student_rows is None else self.student_rows[0]

    def encode(self, prompts: list[str]) -> Conditioning:
        """The training prompts' conditioning (batch B) through every shared text encoder, at the run's image size."""
        return self.pair.conditioner.encode(prompts, self.image_size)

    # --- helpers ---------------------------------------------------------------------------
    def _randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.noise_generator).to(self.device)

    def _randint(self, low: int, high: int, count: int) -> torch.Tensor:
        return torch.randint(low, high + 1, (count,), generator=self.noise_generator).to(self.device)

    def _autocast(self):
        if self.config.mixed_precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.mixed_precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pair.vae
        with torch.no_grad():
            posterior = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
            noise = self._randn(posterior.mean.shape)
            latents = posterior.mean + posterior.std * noise  # (B, 4, h, w)
        return latents.float() * vae.config.scaling_factor

    @torch.no_grad()
    def _encode_references(self) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior (mean, std), each (R, 2, 4, h, w), of every reference photo and its mirror image."""
        vae, pixels = self.pair.vae, self.dataset.reference_pixel_values()  # (R, 3, H, W)
        both = torch.stack([pixels, pixels.flip(-1)], dim=1).flatten(0, 1)  # (2R, 3, H, W): photo, mirror, ...
        means, stds = [], []
        for chunk in both.split(4):  # bounded VAE memory with many references
            posterior = vae.encode(chunk.to(self.device, vae.dtype)).latent_dist
            means.append(posterior.mean.float())
            stds.append(posterior.std.float())
        shape = (len(pixels), 2, *means[0].shape[1:])
        return torch.cat(means).view(shape), torch.cat(stds).view(shape)

    def _real_latents(self, batch) -> torch.Tensor:
        """Latents (B, 4, h, w) of the batch's photos: a fresh posterior draw, from the cache with cache_latents."""
        if not self.config.cache_latents:
            return self._encode_images(batch.pixel_values.to(self.device))
        means, stds = self.reference_posteriors
        index = torch.tensor(batch.indices, device=self.device)
        mirror = torch.tensor([int(f) for f in batch.flipped], device=self.device)
        mean, std = means[index, mirror], stds[index, mirror]  # (B, 4, h, w)
        return (mean + std * self._randn(mean.shape)) * self.pair.vae.config.scaling_factor

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pair.vae
        return vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()  # (B, 3, H, W)

    def _backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        # fp16 autocast needs loss scaling (bf16 and fp32 do not: the scaler is then a no-op).
        self.scalers[id(optimizer)].scale(loss).backward()

    def _apply(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip, step, and clear the gradients, so each loss's gradients never outlive its step."""
        scaler = self.scalers[id(optimizer)]
        if self.config.grad_clip > 0:
            scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def _check_finite(self, terms: dict[str, torch.Tensor]) -> None:
        """Raise before any weight moves if a term is NaN/inf: one device sync for all the terms."""
        values = torch.stack([v.detach().float() for v in terms.values()])
        if bool(torch.isfinite(values).all()):
            return
        name, value = next((n, v) for n, v in terms.items() if not torch.isfinite(v).all())
        where = self.last_checkpoint or "none written yet (set save_every or a run_dir)"
        raise TrainingDiverged(
            f"loss '{name}' became {value.item()} at step {self.step + 1}; the last good checkpoint is "
            f"{where}. Lower the learning rates, or train with mixed_precision='no'."
        )

    def _ensemble_inputs(self, latents: torch.Tensor, images: torch.Tensor | None, cond: Conditioning) -> dict:
        inputs = {"images": images}
        if self.ensemble.needs_latents:
            t = self._randint(0, self.config.discriminator_timestep_max, latents.shape[0])
            inputs.update(
                latents=add_noise(latents, self._randn(latents.shape), t, self.teacher_abar),
                timesteps=t,
                encoder_hidden_states=cond,
            )
        return inputs

    # --- one iteration ---------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg, pair = self.config, self.pair
        teacher_trains = self.step < cfg.teacher_phase_steps  # False only in a sequential run's second half
        student_trains = cfg.schedule == "joint" or not teacher_trains
        adversarial = cfg.weight_adversarial > 0  # 0: no generator term, no heads to train
        logs: dict[str, torch.Tensor] = {}  # turned into floats once, at the end
        batch = self.dataset.sample_batch(cfg.batch_size, self.data_generator)
        real_pixels = batch.pixel_values.to(self.device)  # (B, 3, H, W) in [-1, 1]
        self.offloader.use(*self.encoder_names, *(() if cfg.cache_latents else ("vae",)))
        real_latents = self._real_latents(batch)  # (B, 4, h, w)
        mask = batch.mask.to(self.device)  # (B, 1, h, w)
        prompts, weights = list(batch.prompts), torch.ones(len(batch.prompts), device=self.device)
        teacher_latents = real_latents
        if cfg.echo and len(self.echo):
            echo_latents, echo_prompts = self.echo.sample(cfg.echo_per_step, self.data_generator)
            teacher_latents = torch.cat([real_latents, echo_latents.to(self.device)])
            mask = torch.cat([mask, torch.ones_like(mask[:1]).expand(len(echo_prompts), -1, -1, -1)])
            prompts += echo_prompts
            weights = torch.cat([weights, torch.full((len(echo_prompts),), cfg.echo_weight, device=self.device)])

        # 1. Teacher step: masked denoising on real (+ echoed) latents; reaches teacher K/V and the token row.
        with self._autocast(), torch.set_grad_enabled(teacher_trains):
            cond = self.encode(prompts)  # batch B': states (B', 77, D) [+ SDXL text_embeds, time_ids]
        if teacher_trains:
            with self._autocast():
                noise = self._randn(teacher_latents.shape)
                t = self._randint(0, 999, teacher_latents.shape[0])
                noisy = add_noise(teacher_latents, noise, t, self.teacher_abar)
                prediction = unet_call(pair.teacher.unet, noisy, t, cond)
            target = denoising_target(teacher_latents, noise, t, self.teacher_abar, pair.teacher.prediction_type)
            per_sample = masked_denoising_loss(prediction, target, mask)  # (B',)
            teacher_loss = (per_sample * weights).sum() / weights.sum()
            self._check_finite({"teacher/denoise": teacher_loss})
            self._backward(teacher_loss, self.teacher_optimizer)
            self._apply(self.teacher_optimizer)
            logs["teacher/denoise"] = logs["loss/teacher"] = teacher_loss.detach()
        if not student_trains:  # sequential, first half: the student waits for the finished teacher
            return self._end_step(logs)

        # 2. Student generation from detached prompt embeddings (real prompts only).
        real_count = cfg.batch_size
        teacher_cond = cond[:real_count].detach().float()  # batch B: the teacher's target and features read it
        self.offloader.use("vae", *self.backbone_names, *(() if self.student_rows is None else self.encoder_names))
        student_noise = self._randn(real_latents.shape)  # (B, 4, h, w)
        with self._autocast():
            student_cond = self._student_cond(batch.prompts, teacher_cond)  # batch B
            student_latents = student_one_step(
                pair.student.unet,
                student_noise,
                student_cond,
                self.student_abar,
                pair.student.prediction_type,
                cfg.student_timestep,
            )

        # 3. Teacher target: the student's output re-noised (same noise) to a random t, guided x0.
        target_t = self._randint(cfg.target_timestep_min, cfg.target_timestep_max, real_count)
        with self._autocast():
            target_latents = teacher_target(
                pair.teacher.unet,
                student_latents.detach(),
                student_noise,
                target_t,
                teacher_cond,
                self.uncond,
                cfg.teacher_cfg,
                self.teacher_abar,
                pair.teacher.prediction_type,
                cfg.target_steps,
            )
        alignment_weight = (
            alpha_bar_weight(target_t, self.teacher_abar)
            if cfg.alpha_bar_weighting
            else torch.ones(real_count, device=self.device)
        )  # (B,)

        # 4. Student step: adversarial + alignment; gradients reach the student's K/V only.
        # One differentiable decode of the student serves every pixel loss (and, detached, the heads);
        # the target is decoded, without grad, only for the losses that compare two images.
        semantic = self.clip_member is not None and cfg.weight_semantic > 0
        needs_target_pixels = cfg.weight_ms_swd > 0 or semantic
        needs_pixels = (adversarial and self.ensemble.needs_images) or needs_target_pixels
        with self._autocast():
            student_images = self._decode(student_latents) if needs_pixels else None
            with torch.no_grad():
                target_images = self._decode(target_latents) if needs_target_pixels else None
            fake_logits = (
                self.ensemble(**self._ensemble_inputs(student_latents, student_images, teacher_cond))
                if adversarial else {}
            )
        student_terms = {
            f"student/adv_{name}": generator_adversarial_loss(logits).mean() * cfg.weight_adversarial
            for name, logits in fake_logits.items()
        }
        student_terms["student/latent_mse"] = (
            alignment_weight * latent_mse(student_latents, target_latents)
        ).mean() * cfg.weight_latent_mse
        if cfg.weight_ms_swd > 0:
            swd = ms_swd(
                student_images,
                target_images,
                num_scales=cfg.ms_swd_scales,
                num_projections=cfg.ms_swd_projections,
                generator=self.noise_generator,
            )
            student_terms["student/ms_swd"] = (alignment_weight * swd).mean() * cfg.weight_ms_swd
        if semantic:
            with self._autocast():
                embed_student = self._semantic_embedding(student_images)
                with torch.no_grad():
                    embed_target = self._semantic_embedding(target_images)
            distance = semantic_cosine_distance(embed_student, embed_target)
            student_terms["student/semantic"] = (alignment_weight * distance).mean() * cfg.weight_semantic
        student_loss = sum(student_terms.values())
        self._check_finite(student_terms)
        self._backward(student_loss, self.student_optimizer)
        self._apply(self.student_optimizer)
        logs.update({k: v.detach() for k, v in student_terms.items()})
        logs["loss/student"] = student_loss.detach()

        # 5. Heads step: real photos vs the student's (detached) images, every member.
        if adversarial:
            self.heads_optimizer.zero_grad(set_to_none=True)  # drop what the generator loss left in the heads
            real_cond = cond[:real_count].detach()
            with self._autocast():
                real_logits = self.ensemble(**self._ensemble_inputs(real_latents, real_pixels, real_cond))
                fake_images = student_images.detach() if student_images is not None else None
                fake_logits = self.ensemble(**self._ensemble_inputs(student_latents.detach(), fake_images, real_cond))
            heads_terms = {
                f"heads/{name}": discriminator_loss(real_logits[name], fake_logits[name]).mean() for name in real_logits
            }
            heads_loss = sum(heads_terms.values())
            self._check_finite({"heads": heads_loss})
            self._backward(heads_loss, self.heads_optimizer)
            self._apply(self.heads_optimizer)
            logs.update({k: v.detach() for k, v in heads_terms.items()})
            logs["loss/heads"] = heads_loss.detach()
        return self._end_step(logs)

    def _end_step(self, logs: dict[str, torch.Tensor]) -> dict[str, float]:
        """6. Echo: on schedule, the student's best generations join the teacher's data. Then the logs, as floats."""
        cfg = self.config
        self.step += 1
        if cfg.echo and self.step >= cfg.echo_start and (self.step - cfg.echo_start) % cfg.echo_every == 0:
            self.offloader.use_all()
            logs["echo/kept"] = torch.tensor(float(self.echo_round()))
        values = torch.stack([v.float().to(self.device) for v in logs.values()]).tolist()  # one sync
        return dict(zip(logs, values))

    def _student_cond(self, prompts: list[str], teacher_cond: Conditioning) -> Conditioning:
        """The student's conditioning: the teacher's, detached, or read through its own token row(s)."""
        if self.student_rows is None:
            return teacher_cond.detach().float()
        with reading_with_all(self.pair.text_encoders, self.student_rows):
            return self.encode(prompts).float()  # batch B

    def _semantic_embedding(self, images: torch.Tensor) -> torch.Tensor:
        features = self.clip_member.backbone(images)  # (B, D_clip)
        if self.clip_member.projection is not None:
            features = self.clip_member.projection(features)  # (B, tokens, D_cross)
        return features.float()

    @torch.no_grad()
    def echo_round(self) -> int:
        """Draw `echo_samples` student images in new contexts; keep the best into the buffer."""
        cfg, pair = self.config, self.pair
        contexts = torch.randint(0, 1 << 16, (cfg.echo_samples,), generator=self.data_generator).tolist()
        prompts = [echo_prompt(cfg.echo_prompts, cfg.token, cfg.class_word, c) for c in contexts]
        with self._autocast():
            cond = self.encode(prompts)
            latents = student_one_step(
                pair.student.unet,
                self._randn((len(prompts), pair.student.unet.config.in_channels, *self._latent_size())),
                self._student_cond(prompts, cond),
                self.student_abar,
                pair.student.prediction_type,
                cfg.student_timestep,
            )
            images = self._decode(latents) if self.ensemble.needs_images else None
            # Without the adversarial loss the heads stay untrained: their realness would be noise.
            logits = self.ensemble(**self._ensemble_inputs(latents, images, cond)) if cfg.weight_adversarial > 0 else {}
        scores = self._reference_similarity(latents, images)  # (N,)
        if logits:
            scores = torch.stack([real_probability(v) for v in logits.values()]).mean(0) + scores
        keep = select_best(scores, cfg.echo_keep_ratio)
        self.echo.add(latents[keep], [prompts[i] for i in keep.tolist()])
        return len(keep)

    def _reference_similarity(self, latents: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """Cosine similarity (N,) of each sample to the mean of the reference photos.

        Measured in the first image backbone's embedding when there is one; otherwise in the
        teacher UNet's own mid-block features of the clean latents (no extra weights needed).
        """
        member = next((m for m in self.ensemble.members.values() if m.inputs == "images"), None)
        if member is not None:
            if self.reference_anchor is None:  # frozen backbone, fixed photos: the same every round
                references = self.dataset.reference_pixel_values().to(self.device)  # (R, 3, H, W)
                self.reference_anchor = member.backbone(references).float().mean(0, keepdim=True)  # (1, D)
            return torch.nn.functional.cosine_similarity(member.backbone(images).float(), self.reference_anchor)
        if self.reference_posteriors is None:  # encoded once, reused every round (cache_latents: at the start)
            self.reference_posteriors = self._encode_references()
        reference_latents = self.reference_posteriors[0][:, 0] * self.pair.vae.config.scaling_factor  # (R, 4, h, w)
        features = self.ensemble.members["teacher_features"].features

        def embed(z: torch.Tensor) -> torch.Tensor:  # mid-block features at t = 0, unconditional
            return features(z, 0, self.uncond.expand(z.shape[0]))[-1]  # (n, C)

        anchor = embed(reference_latents).mean(0, keepdim=True)  # (1, C)
        return torch.nn.functional.cosine_similarity(embed(latents), anchor)

    def _latent_size(self) -> tuple[int, int]:
        side = self.config.resolution // self.pair.vae_downscale
        return side, side

    # --- previews, checkpoints, the loop -----------------------------------------------------
    def preview(self, count: int = 2) -> torch.Tensor:
        """One-step student images (N, 3, H, W) in [0, 1] for fixed seeds 0..N-1, for progress displays."""
        self.offloader.use_all()
        return preview_images(self.pair, self.config, self.student_rows, count)

    def checkpoint(self) -> TrainingCheckpoint:
        return TrainingCheckpoint.capture(self)

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        self.last_checkpoint = self.checkpoint().save(path or checkpoint_path(self.run_dir))
        self._last_saved_step = self.step
        return self.last_checkpoint

    def resume(self, path: str | os.PathLike) -> None:
        TrainingCheckpoint.load(path).restore(self)
        self.last_checkpoint = Path(path)
        self._last_saved_step = self.step

    def bundle(self) -> ConceptBundle:
        return ConceptBundle.from_trained_pair(
            self.pair, self.config, self.step, teacher_adapter=adapter_state_dict(self.pair.teacher.unet),
            student_embeddings=None if self.student_rows is None else [r.concept_row for r in self.student_rows],
        )

    def train(self) -> ConceptBundle:
        """Run to `config.steps`; saves on schedule, at the end and on cancel (then raises TrainingCancelled).

        An exception raised by a callback (between two whole steps, so the state is consistent)
        also saves a checkpoint before it propagates: a UI failing never costs the run. With a
        `run_dir`, the run holds it (a second process training into it is refused) and it is probed
        for writing before the first step.
        """
        if self.run_dir is None:
            return self._train()
        check_writable(self.run_dir, "run folder")
        with exclusive_output(self.run_dir, "run folder"):
            return self._train()

    def _train(self) -> ConceptBundle:
        cfg = self.config
        while self.step < cfg.steps:
            if self.callbacks.should_stop():
                checkpoint = self._save_or_explain() if self.run_dir else None
                raise TrainingCancelled(self.step, checkpoint)
            logs = self.train_step()
            try:
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self.callbacks.on_progress(self.step, cfg.steps, logs)
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.callbacks.on_preview(self.step, self.preview())
            except BaseException:
                if self.run_dir:
                    self._save_or_explain()
                raise
            if self.run_dir and cfg.save_every and self.step % cfg.save_every == 0:
                self._save_or_explain()
        # The end is a checkpoint too: more steps later resume from here, and a failed bundle write loses nothing.
        if self.run_dir and not self._saved_at(self.step):
            self._save_or_explain()
        self.callbacks.on_train_end(self.step)
        return self.bundle()

    def _saved_at(self, step: int) -> bool:
        return self.last_checkpoint is not None and self._last_saved_step == step

    def _save_or_explain(self) -> Path:
        """save_checkpoint(); a failed write says where the last good checkpoint is."""
        try:
            path = self.save_checkpoint()
        except OutputWriteError as exc:
            kept = (f"the last checkpoint written is {self.last_checkpoint} (step {self._last_saved_step})"
                    if self.last_checkpoint else "no checkpoint of this run was written")
            raise OutputWriteError(f"{exc}; step {self.step} could not be saved, {kept}") from exc
        return path
