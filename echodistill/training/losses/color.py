"""sRGB -> CIELAB (D65), differentiable, for the MS-SWD colour loss."""

from __future__ import annotations

import torch

# Linear sRGB -> XYZ (IEC 61966-2-1, D65), rows X, Y, Z.
_SRGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)  # Xn, Yn, Zn
_LAB_DELTA = 6.0 / 29.0  # CIE threshold between the linear and cube-root parts of f


def _srgb_decode(c: torch.Tensor) -> torch.Tensor:
    """Gamma-encoded sRGB in [0, 1] -> linear light.

    The power branch reads its input clamped to ≥ 0.04045: ``torch.where`` evaluates both
    branches, and a negative base to the 2.4 would give NaN gradients even where unused.
    """
    power = ((c.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4
    return torch.where(c <= 0.04045, c / 12.92, power)


def _lab_f(t: torch.Tensor) -> torch.Tensor:
    """CIE f(t): t^(1/3) above δ³, the tangent line t/(3δ²) + 4/29 below (same clamp reason)."""
    cube_root = t.clamp_min(_LAB_DELTA**3) ** (1.0 / 3.0)
    return torch.where(t > _LAB_DELTA**3, cube_root, t / (3 * _LAB_DELTA**2) + 4.0 / 29.0)


def srgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (the VAE's range), (B, 3, H, W) -> CIELAB (B, 3, H, W), D65.

    L in [0, 100], a and b roughly in [-128, 127]. Values outside [-1, 1] are not clamped:
    they follow the extended curves (linear segment below 0, power law above 1), so a
    slightly out-of-range decoder output still gets a gradient pulling it back. Computed in
    float32 (the cube root and 2.4 power lose too much in bf16).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    srgb = (images.float() + 1.0) * 0.5  # (B, 3, H, W) in [0, 1]
    linear = _srgb_decode(srgb)  # (B, 3, H, W)
    matrix = torch.tensor(_SRGB_TO_XYZ, dtype=linear.dtype, device=linear.device)  # (3, 3)
    white = torch.tensor(_D65_WHITE, dtype=linear.dtype, device=linear.device)  # (3,)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear)  # (B, 3, H, W)
    fx, fy, fz = _lab_f(xyz / white.view(1, 3, 1, 1)).unbind(dim=1)  # 3 × (B, H, W)
    lightness = 116.0 * fy - 16.0  # (B, H, W)
    a = 500.0 * (fx - fy)  # (B, H, W)
    b = 200.0 * (fy - fz)  # (B, H, W)
    return torch.stack((lightness, a, b), dim=1)  # (B, 3, H, W)
