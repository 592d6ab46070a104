"""Multi-scale sliced Wasserstein distance (MS-SWD) between the colour distributions of two images.

Each image is a bag of CIELAB patches at several scales; the loss compares the two bags as
distributions (which colours appear, in which local arrangements), not pixel by pixel, so it
does not fight the student for moving the subject around, only for changing its colours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from echodistill.training.losses.color import srgb_to_lab

_BINOMIAL_5 = (1.0, 4.0, 6.0, 4.0, 1.0)


def _pyramid_down(images: torch.Tensor) -> torch.Tensor:
    """5-tap binomial blur then 2× decimation, as one stride-2 depthwise conv.

    Replicate padding (not reflect) so that it is defined for any size ≥ 1.
    (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2)).
    """
    channels = images.shape[1]
    taps = torch.tensor(_BINOMIAL_5, dtype=images.dtype, device=images.device) / 16.0  # (5,)
    kernel = (taps[:, None] * taps[None, :]).expand(channels, 1, 5, 5)  # (C, 1, 5, 5)
    padded = F.pad(images, (2, 2, 2, 2), mode="replicate")  # (B, C, H+4, W+4)
    return F.conv2d(padded, kernel, stride=2, groups=channels)  # (B, C, ⌈H/2⌉, ⌈W/2⌉)


def _sliced_w1(
    lab_a: torch.Tensor, lab_b: torch.Tensor, directions: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """Mean over directions of the 1-D W1 distance between the projected patch sets.

    Projecting every patch_size² patch on a direction is a valid convolution with the
    direction reshaped to a (3, p, p) kernel: identical to ``unfold`` followed by a matmul,
    without materialising the (B, 3p², L) patch matrix.
    """
    weight = directions.view(-1, 3, patch_size, patch_size)  # (P, 3, p, p)
    proj_a = F.conv2d(lab_a, weight).flatten(2)  # (B, P, L)
    proj_b = F.conv2d(lab_b, weight).flatten(2)  # (B, P, L)
    sorted_a = proj_a.sort(dim=-1).values  # (B, P, L)
    sorted_b = proj_b.sort(dim=-1).values  # (B, P, L)
    return (sorted_a - sorted_b).abs().mean(dim=(1, 2))  # (B,)


def ms_swd(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    *,
    num_scales: int = 4,
    patch_size: int = 3,
    num_projections: int = 64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample multi-scale sliced Wasserstein-1 distance between CIELAB patch distributions.

    For each pair of images (a, b) in [-1, 1] (same row of the two batches):

        MS-SWD = 1/S · Σ_s 1/P · Σ_k W1(A_sk, B_sk),
        A_sk = {⟨θ_sk, u⟩ : u ∈ patches_s(a)},  B_sk = {⟨θ_sk, u⟩ : u ∈ patches_s(b)}

    where patches_s are all patch_size×patch_size windows (3·p² values, Lab) of level s of a
    Gaussian pyramid (5-tap binomial blur + 2× downsample; it stops early once a level would
    be smaller than the patch, so S ≤ ``num_scales`` is the number of levels built), and θ_sk
    are ``num_projections`` random unit directions drawn fresh per level from ``generator``
    and shared by a and b. Between two equal-size point sets on a line, W1 is the mean
    |difference| of the sorted values.

    Why |·| (W1) and not squared (W2²): the value stays in Lab units (a ΔE-like colour
    difference, so the paper's weight 0.1 sits beside the other terms sensibly), its gradient
    does not fade as the two distributions get close, and a few extreme patches (specular
    highlights, background slivers) do not dominate it.

    Cost: each level holds two (B, P, L) projection tensors plus sort indices; at 512² and
    P = 64 that is ~0.2 GB per image at level 0 — decode at lower resolution if it is tight.

    Args:
        images_a, images_b: (B, 3, H, W) in [-1, 1], same shape.
        num_scales: pyramid levels S (level 0 = full resolution).
        patch_size: p, patch side in pixels.
        num_projections: P, random directions per level.
        generator: source of the directions; pass a seeded one for reproducible values.

    Returns:
        (B,) float32, 0 for identical images.
    """
    if images_a.shape != images_b.shape:
        raise ValueError(
            f"ms_swd needs images of the same size, got {tuple(images_a.shape)} and "
            f"{tuple(images_b.shape)}; resize one to the other first"
        )
    if images_a.ndim != 4 or images_a.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images_a.shape)}")
    for name, value in (
        ("num_scales", num_scales),
        ("patch_size", patch_size),
        ("num_projections", num_projections),
    ):
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1")
    if min(images_a.shape[-2:]) < patch_size:
        raise ValueError(
            f"images of size {tuple(images_a.shape[-2:])} are smaller than "
            f"patch_size={patch_size}"
        )

    # All levels' directions drawn up front: the values for a given seed do not depend on
    # how many levels the image size allows.
    dim = 3 * patch_size * patch_size
    draw_device = generator.device if generator is not None else images_a.device
    directions = torch.randn(
        num_scales, num_projections, dim, generator=generator, device=draw_device
    )  # (S, P, 3p²)
    directions = directions / directions.norm(dim=-1, keepdim=True)  # (S, P, 3p²)
    directions = directions.to(images_a.device)  # (S, P, 3p²)

    lab_a = srgb_to_lab(images_a)  # (B, 3, H, W)
    lab_b = srgb_to_lab(images_b)  # (B, 3, H, W)
    per_level = []
    for level in range(num_scales):
        if level > 0:
            lab_a = _pyramid_down(lab_a)  # (B, 3, H/2^s, W/2^s)
            lab_b = _pyramid_down(lab_b)  # (B, 3, H/2^s, W/2^s)
            if min(lab_a.shape[-2:]) < patch_size:
                break
        per_level.append(_sliced_w1(lab_a, lab_b, directions[level], patch_size))  # (B,)
    return torch.stack(per_level, dim=0).mean(dim=0)  # (B,)
