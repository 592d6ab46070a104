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


SUPPORTED_PAIRS = (
    "EchoDistill trains Stable Diffusion 1.x and 2.x UNets only. Use SD 2.1 as teacher "
    "(v2-1_512-ema-pruned.safetensors) with SD-Turbo as student (sd_turbo.safetensors) - the pair the "
    "method is made for - or two SD 1.5-architecture models (families sd21-base, sd21-768v, sd-turbo, sd15)"
)


def _architecture(keys: list[str], width_of) -> str | None:
    """What an unsupported model is, from its key layout alone (None: SD 1.x / 2.x or unknown)."""
    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    if has("double_blocks.") and has("single_blocks."):
        return "a Flux model (double_blocks / single_blocks transformer)"
    if has("joint_blocks."):
        return "a Stable Diffusion 3 model (MMDiT joint_blocks)"
    # SD-Turbo's own file also keeps its one text tower under conditioner.embedders.0: SDXL has a
    # second tower (embedders.1) and the size/crop embedding (label_emb).
    if any(k.startswith("conditioner.embedders.1.") for k in keys) or has("diffusion_model.label_emb."):
        width = width_of()
        kind = "an SDXL refiner" if width == 1280 else "an SDXL model (SDXL, SDXL-Turbo, Pony, ...)"
        return f"{kind} (two text towers / label_emb, {width}-wide cross-attention)"
    width = width_of()
    if width in (1280, 2048):
        return f"an SDXL UNet ({width}-wide cross-attention)"
    return None


class UnsupportedModelError(ModelLoadError):
    """The model is of an architecture EchoDistill does not train (SDXL, SD3, Flux)."""


def refuse_unsupported(name: str, keys: list[str], width_of) -> None:
    """Raise a ModelLoadError that names the architecture and the pairs to use, for SDXL / SD3 / Flux."""
    what = _architecture(keys, width_of)
    if what is not None:
        raise UnsupportedModelError(f"{name} is {what}, which EchoDistill cannot train or sample. {SUPPORTED_PAIRS}.")


def refuse_unsupported_folder(path: Path) -> None:
    """The same for a diffusers folder, from model_index.json and the UNet's config."""
    index = path / "model_index.json"
    pipeline = ""
    if index.is_file():
        try:
            pipeline = str(json.loads(index.read_text()).get("_class_name", ""))
        except (ValueError, OSError, AttributeError):
            pipeline = ""
    what = None
    if "Flux" in pipeline:
        what = f"a Flux model ({pipeline})"
    elif "StableDiffusion3" in pipeline:
        what = f"a Stable Diffusion 3 model ({pipeline})"
    elif "XL" in pipeline:
        what = f"an SDXL model ({pipeline})"
    elif (path / "unet" / "config.json").is_file():
        try:
            unet = json.loads((path / "unet" / "config.json").read_text())
        except (ValueError, OSError):
            unet = {}
        if unet.get("addition_embed_type") == "text_time" or unet.get("cross_attention_dim") in (1280, 2048):
            what = "an SDXL model (its UNet takes SDXL's text_time conditioning)"
    elif (path / "transformer" / "config.json").is_file():
        what = "a transformer (DiT) model such as SD3 or Flux"
    if what is not None:
        raise UnsupportedModelError(f"{path} is {what}, which EchoDistill cannot train or sample. {SUPPORTED_PAIRS}.")


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
    refuse_unsupported(weights.path.name, list(weights.keys()), lambda: _cross_attention_dim(weights))
    layout, text_kind = detect_layout(weights)
    context_dim = _cross_attention_dim(weights)
    if text_kind is None:
        if context_dim == 768:
            text_kind = "clip"
        elif context_dim == 1024:
            text_kind = "openclip"
        else:
            raise ModelLoadError(
                f"{weights.path.name} has no text tower and a {context_dim}-wide cross-attention, which no "
                "shipped Stable Diffusion 1.x / 2.x family has: pass its family (e.g. teacher_family='sd21-base' "
                f"or a config folder) to read it. {SUPPORTED_PAIRS}."
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
