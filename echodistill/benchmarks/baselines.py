"""Student-only personalization baselines: the one-step student fine-tuned directly, no teacher.

The paper compares against Textual Inversion and Custom Diffusion run directly on SD-Turbo
(DESIGN §1). Each baseline here is the standard masked denoising loss on the student UNet (in its
own parameterization), on the same augmented concept batches the trainer draws; they differ only
in what trains:

    custom_diffusion   cross-attention K/V deltas + the concept token row        (Kumari et al., 2023)
    textual_inversion  the concept token row alone                                (Gal et al., 2023)
    dreambooth_lora    peft LoRA on every attention projection (q, k, v, out);     (Ruiz et al., 2023)
                       the identifier is a rare word's row ("sks"), frozen

    config = baseline_config("textual_inversion", steps=200, resolution=64, class_word="ring")
    bundle = StudentBaseline(pair, images, config, "textual_inversion").train()
    jobs.sample(pair, prompts, concept=bundle, part="student", seeds=0)

The result is a ConceptBundle with no teacher weights, so it is sampled by the same code as an
EchoDistill concept. DreamBooth's prior-preservation loss is not included (the paper's baselines
do not use it either). Like the Trainer, a baseline adapts the pair in place: borrow it with
`pristine(pair)` to get it back unchanged.
"""

from __future__ import annotations

import contextlib

import torch

from ..concepts.bundle import ConceptBundle
from ..errors import EchoDistillError
from ..models.adapters import add_custom_diffusion, add_lora
from ..models.concept import add_concept_token, concept_embedding, concept_parameters
from ..models.diffusion import alphas_cumprod_for, encode_prompts, unet_call
from ..models.pair import ModelPair
from ..models.schedule import add_noise, denoising_target
from ..training.config import TrainConfig
from ..training.data import ConceptDataset, ConceptImage
from ..training.losses import masked_denoising_loss
from .baseline_settings import (  # noqa: F401 - the settings are read from here too
    ATTENTION_PROJECTIONS,
    BASELINES,
    DREAMBOOTH_IDENTIFIER,
    Baseline,
    baseline_config,
    get_baseline,
)


class StudentBaseline:
    """One baseline's training run on the pair's student: `train_step` reads top to bottom."""

    def __init__(self, pair: ModelPair, images: list[ConceptImage], config: TrainConfig, name: str):
        self.pair, self.config, self.name = pair, config, name
        self.baseline = get_baseline(name)
        self.device = pair.device
        torch.manual_seed(config.seed)  # adapter initialisation
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.noise_generator = torch.Generator().manual_seed(config.seed + 1)

        add_concept_token(pair.tokenizer, pair.text_encoder, config.token, config.initializer_word)
        self.dataset = ConceptDataset.from_config(images, config, pair.vae_downscale)
        unet = pair.student.unet
        params: list[torch.nn.Parameter] = []
        if self.baseline.trains_unet:
            if config.adapter == "custom_diffusion":
                params += add_custom_diffusion(unet)
            else:
                params += add_lora(unet, config.lora_rank, config.lora_alpha, config.lora_targets)
        rows = concept_parameters(pair.text_encoder) if self.baseline.trains_token else []
        if not rows:
            concept_embedding(pair.text_encoder).concept_row.requires_grad_(False)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.params = params + rows
        self.optimizer = torch.optim.AdamW(
            config.parameter_groups(params, rows, config.lr_student), betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon, weight_decay=config.weight_decay,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.mixed_precision == "fp16")
        self.abar = alphas_cumprod_for(pair.student.scheduler_config, self.device)  # (T,)
        self.step = 0

    def _randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.noise_generator).to(self.device)

    def _autocast(self):
        if self.config.mixed_precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.mixed_precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self) -> dict[str, float]:
        cfg, pair, vae, unet = self.config, self.pair, self.pair.vae, self.pair.student.unet
        batch = self.dataset.sample_batch(cfg.batch_size, self.data_generator)
        with torch.no_grad():
            posterior = vae.encode(batch.pixel_values.to(self.device, vae.dtype)).latent_dist
            draw = self._randn(posterior.mean.shape)
            latents = (posterior.mean + posterior.std * draw).float() * vae.config.scaling_factor  # (B, 4, h, w)
        with self._autocast():
            cond = encode_prompts(pair.tokenizer, pair.text_encoder, batch.prompts)  # (B, 77, D)
            noise = self._randn(latents.shape)  # (B, 4, h, w)
            t = torch.randint(0, len(self.abar), (latents.shape[0],), generator=self.noise_generator).to(self.device)
            prediction = unet_call(unet, add_noise(latents, noise, t, self.abar), t, cond)  # (B, 4, h, w)
        target = denoising_target(latents, noise, t, self.abar, pair.student.prediction_type)
        loss = masked_denoising_loss(prediction, target, batch.mask.to(self.device)).mean()
        if not torch.isfinite(loss):
            raise EchoDistillError(
                f"the {self.name} loss became {loss.item()} at step {self.step + 1}; lower its learning rate"
            )
        self.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss/student": loss.item()}

    def train(self) -> ConceptBundle:
        while self.step < self.config.steps:
            self.train_step()
        return self.bundle()

    def bundle(self) -> ConceptBundle:
        return ConceptBundle.from_trained_pair(self.pair, self.config, self.step, teacher_adapter={})
