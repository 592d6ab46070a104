"""Training losses as pure functions; each returns per-sample terms of shape (B,).

The trainer weights, sums and logs them; nothing here holds state.
"""

from echodistill.models.schedule import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    PredictionType,
    add_noise,
    alphas_cumprod_from_config,
    denoising_target,
    predict_epsilon,
    predict_x0,
)
from echodistill.training.losses.adversarial import (
    FAKE,
    REAL,
    discriminator_loss,
    generator_adversarial_loss,
    real_probability,
)
from echodistill.training.losses.alignment import latent_mse, semantic_cosine_distance
from echodistill.training.losses.color import srgb_to_lab
from echodistill.training.losses.diffusion import alpha_bar_weight, masked_denoising_loss
from echodistill.training.losses.ms_swd import ms_swd

__all__ = [
    "BETA_SCHEDULES",
    "FAKE",
    "PREDICTION_TYPES",
    "PredictionType",
    "REAL",
    "add_noise",
    "alpha_bar_weight",
    "alphas_cumprod_from_config",
    "denoising_target",
    "discriminator_loss",
    "generator_adversarial_loss",
    "latent_mse",
    "masked_denoising_loss",
    "ms_swd",
    "predict_epsilon",
    "predict_x0",
    "real_probability",
    "semantic_cosine_distance",
    "srgb_to_lab",
]
