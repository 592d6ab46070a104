"""Concept batches: augmented training samples of the reference photos (read by photos.py).

    load_concept_images(folder | paths | PIL images)  ->  list[ConceptImage]  (upright 8-bit RGB)
    ConceptDataset(images, token=..., class_word=...).sample_batch(B, generator)  ->  ConceptBatch

Augmentation follows Custom Diffusion (DESIGN.md section 1): a random rescale that either
shrinks the subject onto a grey canvas ("a far away ..."; the loss is masked to where the image
lies) or zooms into it ("zoomed in ..."), plus horizontal flips and random prompt templates.
Every random choice comes from the caller's ``torch.Generator``, so a seed replays a batch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from echodistill.errors import ConfigError, DataError
from echodistill.training.photos import IMAGE_EXTENSIONS, ConceptImage, load_concept_images, to_rgb
from echodistill.training.templates import PROMPT_TEMPLATES, check_template, render_prompt, subject_phrase

__all__ = ["ConceptBatch", "ConceptDataset", "ConceptImage", "IMAGE_EXTENSIONS", "load_concept_images"]

FAR_PREFIXES = ("a far away ", "very small ")
NEAR_PREFIXES = ("zoomed in ", "close up ")


@dataclass
class ConceptBatch:
    """A training batch of augmented reference images."""

    pixel_values: torch.Tensor  # (B, 3, H, W) float32 in [-1, 1]; 0 (mid-grey) off the image
    mask: torch.Tensor  # (B, 1, H/latent_scale, W/latent_scale) float32, 1 = latent cell valid
    prompts: list[str]
    indices: list[int]  # which reference image each sample came from
    flipped: list[bool] = field(default_factory=list)  # whether each sample is the mirror image

    def __len__(self) -> int:
        return len(self.prompts)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ConceptBatch:
        return replace(
            self,
            pixel_values=self.pixel_values.to(device=device, dtype=dtype),
            mask=self.mask.to(device=device, dtype=dtype),
        )


# --------------------------------------------------------------------------- sampling


class ConceptDataset:
    """Reference images center-cropped once, sampled with Custom-Diffusion augmentation."""

    def __init__(
        self,
        images: Sequence[ConceptImage | Image.Image],
        *,
        token: str,
        class_word: str,
        resolution: int = 512,
        augment: bool = True,
        flip: bool = True,
        templates: Sequence[str] = PROMPT_TEMPLATES,
        latent_scale: int = 8,
        min_scale: float = 1 / 3,
    ) -> None:
        if latent_scale < 1 or resolution < 8 or resolution % latent_scale:
            raise ConfigError(
                f"resolution={resolution} must be at least 8 and a multiple of "
                f"latent_scale={latent_scale} (the VAE's downsampling factor)"
            )
        if not token.strip():
            raise ConfigError("token is empty; pass the concept token string, e.g. '<v*>'")
        if not templates:
            raise ConfigError("templates is empty; pass at least one, e.g. 'a photo of a {}'")
        if not 0 < min_scale <= 1:
            raise ConfigError(f"min_scale={min_scale!r} must be in (0, 1]: a fraction of the resolution")
        for template in templates:
            check_template(template)
        if not images:
            raise DataError("no concept images were given; load them with load_concept_images")

        items = [
            img if isinstance(img, ConceptImage)
            else ConceptImage(image=to_rgb(img), caption=None, name=f"image_{i:03d}")
            for i, img in enumerate(images)
        ]
        self.token = token
        self.class_word = class_word
        self.resolution = resolution
        self.augment = augment
        self.flip = flip
        self.templates = tuple(templates)
        self.latent_scale = latent_scale
        self.min_scale = min_scale
        self.names = [item.name for item in items]
        # A caption may hold "{}" for "<token> <class word>"; otherwise it is used as written.
        subject = subject_phrase(token, class_word)
        self.captions = [
            item.caption.replace("{}", subject) if item.caption else None for item in items
        ]
        missing = [n for n, c in zip(self.names, self.captions) if c and token not in c]
        if missing:
            warnings.warn(
                f"the captions of {', '.join(missing)} do not contain the token {token!r}, so "
                "those images will not train it; write the token (or '{}') into the captions",
                stacklevel=2,
            )
        # uint8 keeps 20 references at 512 px in 16 MB; converted to float per sample
        squares = [_center_square(item.image, resolution) for item in items]
        self._pixels = torch.stack(squares)  # (N, 3, R, R) uint8

    @classmethod
    def from_config(cls, images: Sequence[ConceptImage | Image.Image], config, latent_scale: int) -> ConceptDataset:
        """The dataset a `TrainConfig` describes (token, class word, resolution, augmentation bound).

        `cache_latents` turns the rescale augmentation off: a rescaled photo's latent cannot be cached.
        """
        return cls(images, token=config.token, class_word=config.class_word, resolution=config.resolution,
                   latent_scale=latent_scale, augment=not config.cache_latents, min_scale=config.augment_min_scale)

    def __len__(self) -> int:
        return self._pixels.shape[0]

    def reference_pixel_values(self) -> torch.Tensor:
        """The center-cropped references, un-augmented: (N, 3, R, R) float32 in [-1, 1]."""
        return _to_signed(self._pixels)

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> ConceptBatch:
        """Draw ``batch_size`` augmented samples; the generator is the only source of randomness.

        Images are drawn without replacement while the batch fits in the reference set.
        Each sample takes seven uniforms whatever its branch, so one sample's choices never
        shift another's.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1")
        count = len(self)
        rounds = -(-batch_size // count)
        perms = [torch.randperm(count, generator=generator, device=generator.device)
                 for _ in range(rounds)]
        indices = torch.cat(perms)[:batch_size].tolist()
        draws = torch.rand(batch_size, 7, generator=generator, dtype=torch.float64,
                           device=generator.device).tolist()
        samples = [self._sample(index, u) for index, u in zip(indices, draws)]
        return ConceptBatch(
            pixel_values=torch.stack([s[0] for s in samples]),  # (B, 3, R, R)
            mask=torch.stack([s[1] for s in samples]),  # (B, 1, R/f, R/f)
            prompts=[s[2] for s in samples],
            indices=indices,
            flipped=[s[3] for s in samples],
        )

    def _sample(self, index: int, u: list[float]) -> tuple[torch.Tensor, torch.Tensor, str, bool]:
        u_branch, u_scale, u_prefix, u_top, u_left, u_flip, u_template = u
        size, cells = self.resolution, self.resolution // self.latent_scale
        image = _to_signed(self._pixels[index])  # (3, R, R)
        flipped = self.flip and u_flip < 0.5
        if flipped:
            image = image.flip(-1)
        mask = torch.ones(1, cells, cells)
        prefix = ""
        if self.augment:
            scale = self._draw_scale(u_branch, u_scale)
            if scale < 0.6 * size:
                # subject shrunk onto a mid-grey canvas; the loss only sees latent cells it fills
                prefix = FAR_PREFIXES[_pick(u_prefix, len(FAR_PREFIXES))]
                top, left = _pick(u_top, size - scale + 1), _pick(u_left, size - scale + 1)
                canvas = image.new_zeros(3, size, size)
                canvas[:, top : top + scale, left : left + scale] = _resize(image, scale)
                image = canvas
                mask = _covered_cells(top, left, scale, cells, self.latent_scale)
            elif scale > size:
                prefix = NEAR_PREFIXES[_pick(u_prefix, len(NEAR_PREFIXES))]
                top, left = _pick(u_top, scale - size + 1), _pick(u_left, scale - size + 1)
                image = _resize(image, scale)[:, top : top + size, left : left + size]
        caption = self.captions[index]
        if caption is not None:
            prompt = f"{prefix}{caption}"
        else:
            template = self.templates[_pick(u_template, len(self.templates))]
            prompt = render_prompt(template, self.token, self.class_word, prefix)
        return image.contiguous(), mask, prompt, flipped

    def _draw_scale(self, u_branch: float, u_scale: float) -> int:
        """Custom Diffusion's scale: 2/3 of the time in [min_scale·R, R] (R/3 by default), else in [1.2R, 1.4R]; even."""
        size = self.resolution
        if u_branch < 2.0 / 3.0:
            low, high = int(size * self.min_scale + 1e-9), size  # 1e-9: 192 · (1/3) is 64, not 63.99…
        else:
            low, high = math.ceil(1.2 * size), math.floor(1.4 * size)
        half_low, half_high = -(-low // 2), high // 2
        return 2 * (half_low + _pick(u_scale, half_high - half_low + 1))


def _pick(u: float, n: int) -> int:
    """Map a uniform in [0, 1) to an integer in [0, n)."""
    return min(int(u * n), n - 1)


def _center_square(image: Image.Image, resolution: int) -> torch.Tensor:
    """Center square of the image resized to resolution x resolution: (3, R, R) uint8."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # LANCZOS keeps detail when shrinking; BICUBIC rings less when enlarging small photos
    resample = Image.Resampling.LANCZOS if side > resolution else Image.Resampling.BICUBIC
    square = image.convert("RGB").resize(
        (resolution, resolution), resample, box=(left, top, left + side, top + side)
    )
    return torch.from_numpy(np.array(square, dtype=np.uint8)).permute(2, 0, 1)


def _to_signed(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float().div(127.5).sub(1.0)


def _resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, h, w) -> (3, size, size), antialiased bicubic, kept in [-1, 1]."""
    resized = F.interpolate(image[None], size=(size, size), mode="bicubic",
                            align_corners=False, antialias=True)
    return resized[0].clamp(-1.0, 1.0)


def _covered_cells(top: int, left: int, size: int, cells: int, factor: int) -> torch.Tensor:
    """(1, cells, cells) mask of the latent cells lying wholly inside the pasted square.

    Conservative: a cell half on the grey canvas would teach the model grey borders.
    """
    mask = torch.zeros(1, cells, cells)
    row0, row1 = -(-top // factor), (top + size) // factor
    col0, col1 = -(-left // factor), (left + size) // factor
    mask[:, row0:row1, col0:col1] = 1.0
    return mask
