"""ComfyUI tensors <-> the library's: IMAGE is (B, H, W, C) in [0, 1]; the library's (B, C, H, W)."""

from __future__ import annotations

import numpy as np
import torch
from einops import rearrange
from PIL import Image


def to_comfy_images(images: torch.Tensor) -> torch.Tensor:
    return rearrange(images, "b c h w -> b h w c").contiguous().float().cpu()


def rgb_comfy_images(images, what: str = "images") -> torch.Tensor:
    """Any IMAGE a ComfyUI graph can hand a node, as (B, H, W, 3) float in [0, 1], or a clear error.

    ComfyUI's IMAGE is (B, H, W, C) with C = 3, but graphs also carry 1 channel (masks turned
    into images, grayscale loaders), 2 (gray + alpha) and 4 (RGBA): gray is repeated to RGB and
    alpha is composited on white, as photos with transparency are. One image (H, W, C) is a batch
    of one. Anything else (other channel counts, 5-D video batches, empty batches) is refused.
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{what}: expected a ComfyUI IMAGE tensor, got {type(images).__name__}")
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4:
        raise ValueError(f"{what}: an IMAGE is (batch, height, width, channels); got shape {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise ValueError(f"{what}: the image batch is empty (shape {tuple(images.shape)})")
    images = images.float()
    channels = images.shape[-1]
    if channels in (2, 4):
        colour, alpha = images[..., :-1], images[..., -1:].clamp(0, 1)
        images = colour * alpha + (1 - alpha)  # on white
        channels -= 1
    if channels == 1:
        images = images.expand(*images.shape[:-1], 3)
    elif channels != 3:
        raise ValueError(f"{what}: images with {images.shape[-1]} channels cannot be read as pictures; give "
                         "RGB (3), RGBA (4), gray (1) or gray + alpha (2) images")
    if not torch.isfinite(images).all():
        raise ValueError(f"{what}: the images hold NaN or infinite values")
    return images.clamp(0, 1).contiguous()


def from_comfy_images(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    return rearrange(rgb_comfy_images(images, what), "b h w c -> b c h w").contiguous()


def to_pil_list(images: torch.Tensor, what: str = "images") -> list[Image.Image]:
    array = (rgb_comfy_images(images, what) * 255).round().to(torch.uint8).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray(a) for a in array]


def from_pil(picture: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]  # (1, H, W, 3)
