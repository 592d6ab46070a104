"""Model families: the shipped config folders, and how a single file's family is chosen.

A family is a diffusers-layout config folder (model_index, unet, vae, text_encoder, scheduler)
that fixes the architecture AND the prediction type. The prediction type is read from the
folder's scheduler config; it is never guessed from weights in code. Which folder a single
file gets is decided by `detect_family` from the file's keys and header, with a stated reason,
and the caller can always name the family (or any config folder) instead.

SDXL families (`sdxl-base` teacher, `sdxl-turbo` student) add `text_encoder_2/` (OpenCLIP ViT-bigG
with its projection) and a UNet with `addition_embed_type="text_time"`; `FamilyConfig.is_sdxl`,
`text_components` and `tokenizer_style_of` say what a family's text side is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from ..errors import ModelLoadError
from .checkpoint_layout import SDXL_TEXT_TOWERS, TEXT_PREFIXES, TOWER_NAMES, UNET_PREFIX
from .schedule import BETA_SCHEDULES, PREDICTION_TYPES
from .tensor_files import TensorFile

CONFIG_ROOT = Path(__file__).parent.parent / "configs"
UNET_REQUIRED = ("block_out_channels", "cross_attention_dim")  # what the loaders read from every UNet config
# UNet sizes that must be whole numbers of at least 1 where given (a list of them per block for some; null: unset).
# diffusers checks none of their types: "4" fails deep in torch with an unrelated formatting TypeError.
UNET_SIZES = ("in_channels", "out_channels", "sample_size", "layers_per_block", "block_out_channels",
              "cross_attention_dim", "attention_head_dim", "num_attention_heads", "transformer_layers_per_block",
              "norm_num_groups", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
              "addition_embed_type_num_heads", "conv_in_kernel", "conv_out_kernel")

# name -> (text tower kind, tokenizer style per text encoder, what it is)
FAMILIES: dict[str, tuple[str, str, str]] = {
    "sd-turbo": ("openclip", "sd2", "SD-Turbo (ADD-distilled SD 2.1, 512, epsilon, Euler trailing)"),
    "sd21-base": ("openclip", "sd2", "Stable Diffusion 2.1 base (512, epsilon)"),
    "sd21-768v": ("openclip", "sd2", "Stable Diffusion 2.1 (768, v-prediction)"),
    "sd15": ("clip", "sd1", "Stable Diffusion 1.5 (512, epsilon, CLIP ViT-L text encoder)"),
    "sdxl-base": ("sdxl", "sd1,sd2", "Stable Diffusion XL base 1.0 (1024, epsilon, CLIP ViT-L + OpenCLIP ViT-bigG)"),
    "sdxl-turbo": ("sdxl", "sd1,sd2", "SDXL-Turbo (ADD-distilled SDXL base, 512, epsilon, Euler trailing)"),
}
SDXL_FAMILIES = ("sdxl-base", "sdxl-turbo")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")  # diffusers' names, in prompt-embedding order

Role = Literal["teacher", "student"]


def unet_config_problems(settings) -> list[str]:
    """Each size in a diffusers UNet config (`UNET_SIZES`) that is not a whole number of at least 1, nor a list of
    them, nor null, one phrase each naming the key and its value as written, e.g. 'in_channels is "4", not a whole
    number of at least 1'. Absent keys take diffusers' defaults and are not problems."""

    def whole(value) -> bool:
        if isinstance(value, list):
            return all(whole(item) for item in value)  # per block (nested for SDXL's transformer layers)
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    problems = []
    for key in (k for k in UNET_SIZES if k in settings and settings[k] is not None):
        value = settings[key]
        if not whole(value):
            what = "whole numbers" if isinstance(value, list) else "a whole number"
            problems.append(f"{key} is {json.dumps(value)}, not {what} of at least 1")
    return problems


@dataclass(frozen=True)
class FamilyConfig:
    """A config folder and what it says about the model."""

    name: str
    folder: Path

    def _read(self, part: str, file: str = "config.json") -> dict:
        path = self.folder / part / file
        if not path.is_file():
            raise ModelLoadError(f"config folder {self.folder} lacks {part}/{file}")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path} is not valid JSON ({exc}): restore the file from the model's release") from None
        if not isinstance(config, dict):
            raise ModelLoadError(f"{path} holds a JSON {type(config).__name__}, not a config object")
        return config

    @cached_property
    def unet(self) -> dict:
        config = self._read("unet")
        path = self.folder / "unet" / "config.json"
        missing = [key for key in UNET_REQUIRED if key not in config]
        if missing:
            raise ModelLoadError(f"{path} lacks {', '.join(missing)}: not a UNet config; restore the file from the "
                                 "model's release")
        problems = unet_config_problems(config)
        if problems:
            raise ModelLoadError(f"{path} cannot describe a UNet: {'; '.join(problems)}. Write whole numbers there "
                                 "(without quotes), or restore the file from the model's release.")
        return config

    @cached_property
    def vae(self) -> dict:
        return self._read("vae")

    @cached_property
    def text_encoder(self) -> dict:
        return self._read("text_encoder")

    @cached_property
    def scheduler(self) -> dict:
        """scheduler/scheduler_config.json, with the values training and sampling read checked (ModelLoadError
        naming the file and each wrong value: the schedule and the prediction type decide every timestep)."""
        config = self._read("scheduler", "scheduler_config.json")
        wrong = []
        if config.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
            wrong.append(f"prediction_type {config['prediction_type']!r} (known: {', '.join(PREDICTION_TYPES)})")
        if config.get("beta_schedule", "scaled_linear") not in BETA_SCHEDULES:
            wrong.append(f"beta_schedule {config['beta_schedule']!r} (known: {', '.join(BETA_SCHEDULES)})")
        steps = config.get("num_train_timesteps", 1000)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            wrong.append(f"num_train_timesteps {steps!r} (a whole number of at least 1)")
        for key in ("beta_start", "beta_end"):
            value = config.get(key, 0.001)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
                wrong.append(f"{key} {value!r} (a number between 0 and 1)")
        if wrong:
            raise ModelLoadError(f"{self.folder / 'scheduler' / 'scheduler_config.json'} has {'; '.join(wrong)}: "
                                 "restore the file from the model's release")
        return config

    @property
    def prediction_type(self) -> str:
        return self.scheduler.get("prediction_type", "epsilon")

    @property
    def tokenizer_folder(self) -> Path | None:
        folder = self.folder / "tokenizer"
        return folder if (folder / "vocab.json").is_file() else None

    @cached_property
    def model_index(self) -> dict:
        return self._read("", "model_index.json") if (self.folder / "model_index.json").is_file() else {}

    @property
    def text_components(self) -> tuple[str, ...]:
        """The text encoders the UNet reads, in the order their states are concatenated:
        ("text_encoder",) for SD 1.x / 2.x, ("text_encoder", "text_encoder_2") for SDXL."""
        second = (self.folder / "text_encoder_2" / "config.json").is_file()
        return TEXT_COMPONENTS if second else TEXT_COMPONENTS[:1]

    def text_config(self, component: str = "text_encoder") -> dict:
        """The transformers config of one text encoder component (ModelLoadError if the folder lacks it)."""
        return self.text_encoder if component == "text_encoder" else self._read(component)

    @property
    def is_sdxl(self) -> bool:
        """The UNet takes SDXL's added conditioning (pooled text + size/crop ids: `addition_embed_type` "text_time")."""
        return self.unet.get("addition_embed_type") == "text_time"

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """SDXL's published pipelines use all-zero embeddings, not the encoded "", for an empty negative prompt."""
        return bool(self.model_index.get("force_zeros_for_empty_prompt", False)) and self.is_sdxl

    def tokenizer_style_of(self, component: str = "text_encoder") -> str:
        """"sd1" (pads with <|endoftext|>) or "sd2" (pads with "!") for one text encoder component."""
        if self.name in FAMILIES:
            styles = FAMILIES[self.name][1].split(",")
            return styles[self.text_components.index(component)]
        # OpenAI's CLIP (SD 1.x, SDXL's first tower) uses quick_gelu and pads with <|endoftext|>;
        # OpenCLIP pads with "!".
        return "sd1" if self.text_config(component).get("hidden_act") == "quick_gelu" else "sd2"

    @property
    def tokenizer_style(self) -> str:
        return self.tokenizer_style_of("text_encoder")

    @property
    def text_architecture(self) -> str:
        """What must match for two models to share their text encoder(s)."""
        parts = []
        for component in self.text_components:
            c = self.text_config(component)
            projection = f" with a {c.get('projection_dim')}-wide projection" if component == "text_encoder_2" else ""
            parts.append(
                f"{c['hidden_size']}-wide {c['num_hidden_layers']}-layer {c.get('hidden_act', 'gelu')} "
                f"CLIP text encoder{projection} ({c.get('vocab_size', 49408)} tokens)"
            )
        return " + ".join(parts)

    @property
    def context_width(self) -> int:
        """Width of the prompt states the UNet cross-attends to: the text encoders' widths summed."""
        return sum(self.text_config(c)["hidden_size"] for c in self.text_components)


def family_config(family: str | os.PathLike) -> FamilyConfig:
    """A shipped family by name, or any diffusers-layout config folder by path."""
    if isinstance(family, str) and family in FAMILIES:
        return FamilyConfig(family, CONFIG_ROOT / family)
    folder = Path(family)
    if folder.is_dir() and (folder / "unet" / "config.json").is_file():
        return FamilyConfig(folder.name, folder)
    raise ModelLoadError(
        f"unknown model family {str(family)!r}: use one of {', '.join(FAMILIES)} "
        "or a folder holding diffusers configs (unet/, vae/, text_encoder/ [+ text_encoder_2/], scheduler/)"
    )


@dataclass(frozen=True)
class Detection:
    family: str
    layout: str
    text_kind: str | None
    reason: str


SUPPORTED_PAIRS = (
    "EchoDistill trains Stable Diffusion 1.x, 2.x and SDXL UNets. Use SD 2.1 as teacher "
    "(v2-1_512-ema-pruned.safetensors) with SD-Turbo as student (sd_turbo.safetensors) - the pair the "
    "method is made for - or SDXL base (sd_xl_base_1.0.safetensors) with SDXL-Turbo (sd_xl_turbo_1.0.safetensors), "
    "or two SD 1.5-architecture models (families sd21-base, sd21-768v, sd-turbo, sd15, sdxl-base, sdxl-turbo)"
)


def _is_sdxl_file(keys: list[str]) -> bool:
    """SD-Turbo's own file also keeps its one text tower under conditioner.embedders.0: SDXL has a
    second tower (embedders.1) and the size/crop embedding (label_emb)."""
    return any(k.startswith("conditioner.embedders.1.") or ".label_emb." in k for k in keys)


def _architecture(keys: list[str], width_of) -> str | None:
    """What an unsupported model is, from its key layout alone (None: SD 1.x / 2.x / SDXL or unknown)."""
    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    if has("double_blocks.") and has("single_blocks."):
        return "a Flux model (double_blocks / single_blocks transformer)"
    if has("joint_blocks."):
        return "a Stable Diffusion 3 model (MMDiT joint_blocks)"
    width = width_of()
    if width == 1280:  # the refiner cross-attends to OpenCLIP ViT-bigG alone and takes aesthetic-score ids
        return "an SDXL refiner (one 1280-wide OpenCLIP ViT-bigG text tower, label_emb)"
    return None


class UnsupportedModelError(ModelLoadError):
    """The model is of an architecture EchoDistill does not train (SDXL refiner, SD3, Flux)."""


def refuse_unsupported(name: str, keys: list[str], width_of) -> None:
    """Raise a ModelLoadError that names the architecture and the pairs to use, for an SDXL refiner / SD3 / Flux."""
    what = _architecture(keys, width_of)
    if what is not None:
        raise UnsupportedModelError(f"{name} is {what}, which EchoDistill cannot train or sample. {SUPPORTED_PAIRS}.")


def refuse_unsupported_folder(path: Path) -> None:
    """The same for a diffusers folder, from model_index.json and the UNet's config (SDXL itself is read)."""
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
    elif (path / "unet" / "config.json").is_file():
        try:
            unet = json.loads((path / "unet" / "config.json").read_text())
        except (ValueError, OSError):
            unet = {}
        if isinstance(unet, dict) and unet.get("cross_attention_dim") == 1280:  # anything else: the loader says
            what = "an SDXL refiner (its UNet cross-attends to one 1280-wide OpenCLIP ViT-bigG tower)"
    elif (path / "transformer" / "config.json").is_file():
        what = "a transformer (DiT) model such as SD3 or Flux"
    if what is not None:
        raise UnsupportedModelError(f"{path} is {what}, which EchoDistill cannot train or sample. {SUPPORTED_PAIRS}.")


def detect_layout(weights: TensorFile) -> tuple[str, str | None]:
    """(layout, text tower kind) of a single file, from its keys alone; kind "sdxl" for SDXL's two towers."""
    keys = weights.keys()
    towers = {component: any(k.startswith(prefix) for k in keys) for component, (_, prefix) in SDXL_TEXT_TOWERS.items()}
    if all(towers.values()):
        return "sgm", "sdxl"
    if any(towers.values()):  # one SDXL tower without the other: no SDXL model reads prompts with one
        (present,), (absent,) = [c for c, has in towers.items() if has], [c for c, has in towers.items() if not has]
        raise ModelLoadError(
            f"{weights.path.name} is a partial SDXL checkpoint: it holds the {TOWER_NAMES[present]} "
            f"({SDXL_TEXT_TOWERS[present][1]}*) but not the {TOWER_NAMES[absent]} ({SDXL_TEXT_TOWERS[absent][1]}*). "
            "Give the whole file (SDXL base / SDXL-Turbo hold both text encoders) or a diffusers folder."
        )
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
    header. SDXL (two text towers, or `label_emb` and 2048-wide cross-attention) is SDXL-Turbo
    when the header's `modelspec.architecture` / title names turbo, SDXL base when the header
    names another SDXL model, and otherwise SDXL-Turbo for a student and SDXL base for a teacher.
    """
    keys = list(weights.keys())
    refuse_unsupported(weights.path.name, keys, lambda: _cross_attention_dim(weights))
    layout, text_kind = detect_layout(weights)
    context_dim = _cross_attention_dim(weights)
    header = " ".join(str(v).lower() for k, v in weights.metadata.items() if k.startswith("modelspec."))
    if text_kind == "sdxl" or _is_sdxl_file(keys) or context_dim == 2048:
        return _detect_sdxl(layout, text_kind, header, role)
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


def _detect_sdxl(layout: str, text_kind: str | None, header: str, role: Role) -> Detection:
    towers = "CLIP ViT-L + OpenCLIP ViT-bigG text towers" if text_kind == "sdxl" else "SDXL UNet without text towers"
    if "turbo" in header:
        return Detection("sdxl-turbo", layout, text_kind, f"{towers}, file header names SDXL-Turbo")
    if header:
        return Detection("sdxl-base", layout, text_kind, f"{towers}, file header names an SDXL model")
    if role == "student":
        return Detection("sdxl-turbo", layout, text_kind, f"{towers}, student role: SDXL-Turbo")
    return Detection("sdxl-base", layout, text_kind, f"{towers}, teacher role, no header: SDXL base")
