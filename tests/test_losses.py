"""Losses: agreement with diffusers' schedulers, hand-computed values, invariances, gradients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from echodistill.models.schedule import (
    add_noise,
    alphas_cumprod_from_config,
    denoising_target,
    predict_epsilon,
    predict_x0,
)
from echodistill.training.losses import (
    FAKE,
    REAL,
    alpha_bar_weight,
    discriminator_loss,
    generator_adversarial_loss,
    latent_mse,
    masked_denoising_loss,
    ms_swd,
    real_probability,
    semantic_cosine_distance,
    srgb_to_lab,
)

CONFIGS = Path(__file__).resolve().parents[1] / "echodistill" / "configs"
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- diffusion -------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_alphas_cumprod_matches_diffusers(beta_schedule):
    kwargs = dict(beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000)
    if beta_schedule == "scaled_linear":
        kwargs = dict(SD_SCHEDULE)
    ours = alphas_cumprod_from_config(beta_schedule=beta_schedule, **kwargs)
    theirs = DDPMScheduler(beta_schedule=beta_schedule, **kwargs).alphas_cumprod
    assert ours.shape == (1000,)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)


def test_alphas_cumprod_unknown_schedule_lists_valid():
    with pytest.raises(ValueError, match=r"beta_schedule='cosine'.*valid: scaled_linear, linear"):
        alphas_cumprod_from_config(beta_schedule="cosine", **SD_SCHEDULE)


@pytest.mark.parametrize("config_dir", ["sd21-base", "sd21-768v", "sd-turbo"])
def test_add_noise_and_velocity_match_diffusers(config_dir):
    config = json.loads((CONFIGS / config_dir / "scheduler" / "scheduler_config.json").read_text())
    scheduler = DDPMScheduler(
        beta_start=config["beta_start"],
        beta_end=config["beta_end"],
        num_train_timesteps=config["num_train_timesteps"],
        beta_schedule=config["beta_schedule"],
    )
    alphas_cumprod = alphas_cumprod_from_config(
        config["beta_start"],
        config["beta_end"],
        config["num_train_timesteps"],
        config["beta_schedule"],
    )
    gen = _generator(0)
    latents = torch.randn(4, 4, 8, 8, generator=gen)  # (B, 4, h, w)
    noise = torch.randn(4, 4, 8, 8, generator=gen)  # (B, 4, h, w)
    timesteps = torch.tensor([0, 10, 500, 999])  # (B,)

    noisy = add_noise(latents, noise, timesteps, alphas_cumprod)
    torch.testing.assert_close(
        noisy, scheduler.add_noise(latents, noise, timesteps), rtol=0, atol=1e-6
    )
    velocity = denoising_target(latents, noise, timesteps, alphas_cumprod, "v_prediction")
    torch.testing.assert_close(
        velocity, scheduler.get_velocity(latents, noise, timesteps), rtol=0, atol=1e-6
    )
    assert denoising_target(latents, noise, timesteps, alphas_cumprod, "epsilon") is noise
    assert denoising_target(latents, noise, timesteps, alphas_cumprod, "sample") is latents


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_and_epsilon_invert_add_noise(prediction_type):
    alphas_cumprod = alphas_cumprod_from_config(beta_schedule="scaled_linear", **SD_SCHEDULE)
    gen = _generator(1)
    latents = torch.randn(5, 4, 6, 6, generator=gen, dtype=torch.float64)  # (B, 4, h, w)
    noise = torch.randn(5, 4, 6, 6, generator=gen, dtype=torch.float64)  # (B, 4, h, w)
    timesteps = torch.tensor([0, 1, 250, 750, 999])  # (B,)
    noisy = add_noise(latents, noise, timesteps, alphas_cumprod)  # (B, 4, h, w)
    # A perfect model outputs exactly the target; inverting it must give back x_0 and ε.
    output = denoising_target(latents, noise, timesteps, alphas_cumprod, prediction_type)
    x0 = predict_x0(output, noisy, timesteps, alphas_cumprod, prediction_type)
    eps = predict_epsilon(output, noisy, timesteps, alphas_cumprod, prediction_type)
    torch.testing.assert_close(x0, latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(eps, noise, rtol=0, atol=1e-5)


def test_unknown_prediction_type_lists_valid():
    alphas_cumprod = alphas_cumprod_from_config(beta_schedule="scaled_linear", **SD_SCHEDULE)
    x = torch.zeros(1, 4, 2, 2)
    t = torch.tensor([3])
    with pytest.raises(ValueError, match=r"'flow'.*valid: epsilon, v_prediction, sample"):
        denoising_target(x, x, t, alphas_cumprod, "flow")
    with pytest.raises(ValueError, match="valid: epsilon"):
        predict_x0(x, x, t, alphas_cumprod, "flow")
    with pytest.raises(ValueError, match="valid: epsilon"):
        predict_epsilon(x, x, t, alphas_cumprod, "flow")


def test_masked_denoising_loss_ignores_masked_positions():
    gen = _generator(2)
    pred = torch.randn(3, 4, 8, 8, generator=gen)  # (B, 4, h, w)
    target = torch.randn(3, 4, 8, 8, generator=gen)  # (B, 4, h, w)
    mask = torch.ones(3, 1, 8, 8)  # (B, 1, h, w)
    mask[0, :, :, :3] = 0  # sample 0: left 3 columns invalid
    mask[2] = 0  # sample 2: nothing valid

    loss = masked_denoising_loss(pred, target, mask)
    assert loss.shape == (3,)

    expected0 = ((pred[0, :, :, 3:] - target[0, :, :, 3:]) ** 2).mean()
    torch.testing.assert_close(loss[0], expected0)
    torch.testing.assert_close(loss[1], ((pred[1] - target[1]) ** 2).mean())
    assert loss[2] == 0

    # Anything in the masked-out area, even inf/NaN, leaves the loss unchanged.
    changed = pred.clone()
    changed[0, :, :, :3] = 1e3
    changed[2] = float("nan")
    torch.testing.assert_close(masked_denoising_loss(changed, target, mask), loss)

    # ... and gets no gradient, while the all-zero sample gives a finite (zero) gradient.
    pred_grad = pred.clone().requires_grad_(True)
    masked_denoising_loss(pred_grad, target, mask).sum().backward()
    assert torch.isfinite(pred_grad.grad).all()
    assert (pred_grad.grad[0, :, :, :3] == 0).all()
    assert (pred_grad.grad[2] == 0).all()

    # No mask means every position counts.
    full_mask = torch.ones_like(mask)  # (B, 1, h, w)
    torch.testing.assert_close(
        masked_denoising_loss(pred, target), masked_denoising_loss(pred, target, full_mask)
    )


def test_masked_denoising_loss_rejects_wrong_mask_shape():
    x = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"mask must be \(B, 1, h, w\)"):
        masked_denoising_loss(x, x, torch.ones(2, 4, 8, 8))


def test_alpha_bar_weight_decreases_with_t():
    alphas_cumprod = alphas_cumprod_from_config(beta_schedule="scaled_linear", **SD_SCHEDULE)
    weight = alpha_bar_weight(torch.arange(1000), alphas_cumprod)
    assert weight.shape == (1000,)
    assert (weight[1:] < weight[:-1]).all()
    assert 0.99 < weight[0] <= 1.0 and 0 < weight[-1] < 0.01


# --- alignment -------------------------------------------------------------------------------


def test_latent_mse_hand_computed():
    student = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.ones(1, 2, 2), torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])])
    # 0.5 · mean(1) = 0.5;  0.5 · (1 + 4 + 9 + 16) / 4 = 3.75
    torch.testing.assert_close(latent_mse(student, target), torch.tensor([0.5, 3.75]))


def test_semantic_cosine_distance_hand_computed():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0], [4.0, 3.0]])
    # orthogonal 1; parallel 0; opposite 2; 1 − 24/25
    torch.testing.assert_close(
        semantic_cosine_distance(a, b), torch.tensor([1.0, 0.0, 2.0, 0.04]), rtol=0, atol=1e-6
    )
    # (B, N, D): the token sequence is one vector, dot = 1 − 1 = 0 -> distance 1.
    seq_a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    seq_b = torch.tensor([[[1.0, 0.0], [0.0, -1.0]]])
    torch.testing.assert_close(semantic_cosine_distance(seq_a, seq_b), torch.tensor([1.0]))


# --- colour ----------------------------------------------------------------------------------


def _solid(rgb01: tuple[float, float, float], size: int = 2) -> torch.Tensor:
    """A (1, 3, size, size) image in [-1, 1] of one sRGB colour given in [0, 1]."""
    return (torch.tensor(rgb01).view(1, 3, 1, 1) * 2 - 1).expand(1, 3, size, size).clone()


@pytest.mark.parametrize(
    ("rgb", "lab"),
    [
        ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
        ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
        ((1.0, 0.0, 0.0), (53.24, 80.09, 67.20)),
    ],
)
def test_srgb_to_lab_known_colours(rgb, lab):
    out = srgb_to_lab(_solid(rgb))  # (1, 3, 2, 2)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor(lab), rtol=0, atol=0.05)


def test_srgb_to_lab_gradients_finite_at_branch_edges():
    # Black (0), the gamma threshold, and slightly out of range on both sides.
    values = torch.tensor([-1.05, -1.0, 0.04045 * 2 - 1, 0.0, 1.0, 1.05])
    images = values.view(1, 1, 1, -1).expand(1, 3, 1, 6).clone().requires_grad_(True)
    srgb_to_lab(images).sum().backward()
    assert torch.isfinite(images.grad).all()


# --- MS-SWD ----------------------------------------------------------------------------------


def _images(seed: int, batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=_generator(seed)) - 0.5  # in [-0.5, 0.5]


def test_ms_swd_zero_for_identical_images():
    images = _images(0)
    value = ms_swd(images, images.clone(), generator=_generator(0))
    assert value.shape == (2,)
    assert (value.abs() < 1e-6).all()


def test_ms_swd_grows_with_colour_shift_and_is_per_sample():
    images = _images(1)
    values = []
    for shift in (0.05, 0.1, 0.2, 0.4):
        shifted = images.clone()
        shifted[:, 0] += shift  # redder
        values.append(ms_swd(images, shifted, generator=_generator(7)))
    values = torch.stack(values)  # (shifts, B)
    assert (values[1:] > values[:-1]).all()

    # Sample 0 paired with itself, sample 1 with a shifted copy: only sample 1 is far.
    pair = images.clone()
    pair[1, 0] += 0.2
    per_sample = ms_swd(images, pair, generator=_generator(7))
    assert per_sample[0].abs() < 1e-6 and per_sample[1] > 1.0


def test_ms_swd_invariant_to_pixel_permutation_at_one_scale():
    a, b = _images(2, batch=1), _images(3, batch=1)
    perm = torch.randperm(16 * 16, generator=_generator(4))
    b_perm = b.flatten(2)[:, :, perm].view_as(b)
    kwargs = dict(num_scales=1, patch_size=1, num_projections=16)
    base = ms_swd(a, b, generator=_generator(5), **kwargs)
    permuted = ms_swd(a, b_perm, generator=_generator(5), **kwargs)
    assert base > 0.1
    torch.testing.assert_close(permuted, base, rtol=1e-6, atol=1e-6)


def test_ms_swd_reproducible_with_seed():
    a, b = _images(4), _images(5)
    first = ms_swd(a, b, generator=_generator(11))
    torch.testing.assert_close(ms_swd(a, b, generator=_generator(11)), first, rtol=0, atol=0)
    assert not torch.allclose(ms_swd(a, b, generator=_generator(12)), first)


def test_ms_swd_projection_equals_unfold_reference():
    # One level: the conv projection must equal "unfold all patches, project, sort, W1".
    a, b = _images(6, batch=2, size=9), _images(7, batch=2, size=9)
    ours = ms_swd(a, b, num_scales=1, patch_size=3, num_projections=8, generator=_generator(3))

    directions = torch.randn(1, 8, 27, generator=_generator(3))[0]  # (P, 27)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    patches_a = F.unfold(srgb_to_lab(a), kernel_size=3)  # (B, 27, L)
    patches_b = F.unfold(srgb_to_lab(b), kernel_size=3)  # (B, 27, L)
    proj_a = torch.einsum("pd,bdl->bpl", directions, patches_a).sort(dim=-1).values
    proj_b = torch.einsum("pd,bdl->bpl", directions, patches_b).sort(dim=-1).values
    reference = (proj_a - proj_b).abs().mean(dim=(1, 2))  # (B,)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_ms_swd_gradients_finite_and_early_stop():
    a = _images(8, size=12)
    a[:, :, :2] = -1.0  # black rows: the Lab/gamma clamps must keep gradients finite
    a.requires_grad_(True)
    b = _images(9, size=12)
    # 12 -> 6 -> 3 -> 2 (< patch 3): stops after three of the ten requested levels.
    value = ms_swd(a, b, num_scales=10, generator=_generator(0))
    assert torch.isfinite(value).all()
    value.sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_ms_swd_rejects_different_sizes():
    with pytest.raises(ValueError, match="same size"):
        ms_swd(_images(0, size=16), _images(0, size=8))
    with pytest.raises(ValueError, match="smaller than patch_size=3"):
        ms_swd(_images(0, size=2), _images(0, size=2))


# --- adversarial -----------------------------------------------------------------------------


def _logits(toward: int, confidence: float = 10.0, batch: int = 2) -> torch.Tensor:
    logits = torch.full((batch, 2), -confidence)
    logits[:, toward] = confidence
    return logits  # (B, 2)


def test_class_convention():
    assert (REAL, FAKE) == (1, 0)
    torch.testing.assert_close(real_probability(_logits(REAL)), torch.ones(2), atol=1e-6, rtol=0)


def test_generator_loss_signs():
    fooled = generator_adversarial_loss(_logits(REAL))
    caught = generator_adversarial_loss(_logits(FAKE))
    assert fooled.shape == caught.shape == (2,)
    assert (fooled < 1e-3).all() and (caught > 10).all()


def test_generator_loss_gradient_pushes_toward_real():
    fake_logits = torch.zeros(3, 2, requires_grad=True)
    generator_adversarial_loss(fake_logits).sum().backward()
    # Gradient descent moves logits against the gradient: REAL up, FAKE down.
    assert (fake_logits.grad[:, REAL] < 0).all() and (fake_logits.grad[:, FAKE] > 0).all()


def test_discriminator_loss_minimal_when_correct():
    correct = discriminator_loss(_logits(REAL), _logits(FAKE))
    unsure = discriminator_loss(torch.zeros(2, 2), torch.zeros(2, 2))
    wrong = discriminator_loss(_logits(FAKE), _logits(REAL))
    assert correct.shape == (2,)
    assert (correct < 1e-3).all()
    torch.testing.assert_close(unsure, torch.full((2,), torch.log(torch.tensor(2.0)).item()))
    assert (correct < unsure).all() and (unsure < wrong).all()


def test_adversarial_losses_check_shapes():
    with pytest.raises(ValueError, match=r"2 real and 3 fake"):
        discriminator_loss(_logits(REAL, batch=2), _logits(FAKE, batch=3))
    with pytest.raises(ValueError, match=r"fake_logits must be \(B, 2\)"):
        generator_adversarial_loss(torch.zeros(2, 3))
