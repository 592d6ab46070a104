"""Model families: the shipped config folders, and how a single file's family is chosen.

A family is a diffusers-layout config folder (model_index, unet, vae, text_encoder, scheduler)
that fixes the architecture AND the prediction type. The prediction type is read from the
folder's scheduler config; it is never guessed from weights in code. Which folder a single
file gets is decided by `detect_family` from the file's keys and header, with a stated reason,
and the caller can always name the family (or any config folder) instead.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from ..errors import ModelLoadError
from .checkpoint_layout import TEXT_PREFIXES, UNET_PREFIX
from .tensor_files import TensorFile

CONFIG_ROOT = Path(__file__).parent.parent / "configs"

# name -> (text tower kind, tokenizer style, what it is)
FAMILIES: dict[str, tuple[str, str, str]] = {
    "sd-turbo": ("openclip", "sd2", "SD-Turbo (ADD-distilled SD 2.1, 512, epsilon, Euler trailing)"),
    "sd21-base": ("openclip", "sd2", "Stable Diffusion 2.1 base (512, epsilon)"),
    "sd21-768v": ("openclip", "sd2", "Stable Diffusion 2.1 (768, v-prediction)"),
    "sd15": ("clip", "sd1", "Stable Diffusion 1.5 (512, epsilon, CLIP ViT-L text encoder)"),
}

Role = Literal["teacher", "student"]


@dataclass(frozen=True)
class FamilyConfig:
    """A config folder and what it says about the model."""

    name: str
    folder: Path

    def _read(self, part: str, file: str = "config.json") -> dict:
        path = self.folder / part / file
        if not path.is_file():
            raise ModelLoadError(f"config folder {self.folder} lacks {part}/{file}")
        return json.loads(path.read_text())

    @cached_property
    def unet(self) -> dict:
        return self._read("unet")

    @cached_property
    def vae(self) -> dict:
        return self._read("vae")

    @cached_property
    def text_encoder(self) -> dict:
        return self._read("text_encoder")

    @cached_property
    def scheduler(self) -> dict:
        return self._read("scheduler", "scheduler_config.json")

    @property
    def prediction_type(self) -> str:
        return self.scheduler.get("prediction_type", "epsilon")

    @property
    def tokenizer_folder(self) -> Path | None:
        folder = self.folder / "tokenizer"
        return folder if (folder / "vocab.json").is_file() else None

    @property
    def tokenizer_style(self) -> str:
        if self.name in FAMILIES:
            return FAMILIES[self.name][1]
        # OpenAI's CLIP (SD 1.x) uses quick_gelu and pads with <|endoftext|>; OpenCLIP pads with "!".
        return "sd1" if self.text_encoder.get("hidden_act") == "quick_gelu" else "sd2"

    @property
    def text_architecture(self) -> str:
        """What must match for two models to share one text encoder."""
        c = self.text_encoder
        return (
            f"{c['hidden_size']}-wide {c['num_hidden_layers']}-layer {c.get('hidden_act', 'gelu')} "
            f"CLIP text encoder ({c.get('vocab_size', 49408)} tokens)"
        )


def family_config(family: str | os.PathLike) -> FamilyConfig:
    """A shipped family by name, or any diffusers-layout config folder by path."""
    if isinstance(family, str) and family in FAMILIES:
        return FamilyConfig(family, CONFIG_ROOT / family)
    folder = Path(family)
    if folder.is_dir() and (folder / "unet" / "config.json").is_file():
        return FamilyConfig(folder.name, folder)
    raise ModelLoadError(
        f"unknown model family {str(family)!r}: use one of {', '.join(FAMILIES)} "
        "or a folder holding diffusers configs (unet/, vae/, text_encoder/, scheduler/)"
    )


@dataclass(frozen=True)
class Detection:
    family: str
    layout: str
    text_kind: str | None
    reason: str


def detect_layout(weights: TensorFile) -> tuple[str, str | None]:
    """(layout, text tower kind) of a single file, from its keys alone."""
    keys = weights.keys()
    for (layout, kind), prefix in TEXT_PREFIXES.items():
        if any(k.startswith(prefix) for k in keys):
            return layout, kind
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "ldm", "clip"  # older files without the text_model. level
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return "ldm", None
    raise ModelLoadError(
        f"{weights.path.name} is not a Stable Diffusion checkpoint: no '{UNET_PREFIX}*' keys. "
        "Give a full single-file checkpoint or a diffusers folder."
    )


def _cross_attention_dim(weights: TensorFile) -> int | None:
    for key in weights.keys():
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight"):
            return weights.shape(key)[1]
    return None


def detect_family(weights: TensorFile, role: Role) -> Detection:
    """Choose the config family of a single file; `reason` says why, for the user to check.

    SD 1.x vs 2.x comes from the text tower's layout and the UNet's cross-attention width.
    Within SD 2.x the weights do not say which config applies, so the file's own header
    (`modelspec.*`) decides when present; otherwise a student is SD-Turbo and a teacher is
    SD 2.1 base (epsilon). Pass the family explicitly for an SD 2.1 768-v teacher without a
    header.
    """
    layout, text_kind = detect_layout(weights)
    context_dim = _cross_attention_dim(weights)
    if text_kind is None:
        if context_dim == 768:
            text_kind = "clip"
        elif context_dim == 1024:
            text_kind = "openclip"
        else:
            raise ModelLoadError(
                f"{weights.path.name} has no text tower and a {context_dim}-wide cross-attention; "
                "name its family explicitly"
            )
    if text_kind == "clip":
        return Detection("sd15", layout, text_kind, "CLIP ViT-L text tower (SD 1.x)")

    header = " ".join(str(v).lower() for k, v in weights.metadata.items() if k.startswith("modelspec."))
    if "turbo" in header:
        return Detection("sd-turbo", layout, text_kind, "file header names SD-Turbo")
    declared_prediction = weights.metadata.get("modelspec.prediction_type", "").lower()
    if "768-v" in header or declared_prediction in ("v", "v_prediction", "v-prediction"):
        return Detection("sd21-768v", layout, text_kind, "file header says v-prediction")
    if header:
        return Detection("sd21-base", layout, text_kind, "file header names an SD 2.x epsilon model")
    if role == "student":
        return Detection("sd-turbo", layout, text_kind, "OpenCLIP text tower, student role: SD-Turbo")
    return Detection(
        "sd21-base",
        layout,
        text_kind,
        "OpenCLIP text tower, teacher role, no header: SD 2.1 base (epsilon); "
        "pass family='sd21-768v' for the 768 v-prediction model",
    )
