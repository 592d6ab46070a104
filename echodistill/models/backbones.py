"""Frozen image backbones for the discriminator ensemble, loaded from local files only.

Each backbone takes images in [-1, 1], resizes and normalizes them itself, and returns one
feature vector per image. Its weights never train and never receive a gradient, but the
forward stays differentiable in the *input*: the student's adversarial loss flows back
through it into the generated images.

Two layouts are accepted for every backbone:
  * a transformers folder (``config.json`` + ``model.safetensors``), loaded offline;
  * a single ``.safetensors`` file holding the transformers state dict, e.g. ComfyUI's
    ``models/clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors``. Its config is
    inferred from tensor shapes (see :func:`infer_config`).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    PretrainedConfig,
    ViTConfig,
    ViTModel,
)

from ..errors import BackboneError
from .tensor_files import open_safetensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Family = Literal["vit", "dinov2", "clip"]


@dataclass(frozen=True)
class BackboneSpec:
    """How to build, feed and read one named backbone."""

    family: Family = field(metadata={"help": "state-dict layout: transformers ViT, DINOv2 or CLIP vision"})
    description: str = field(metadata={"help": "human name used in messages"})
    file_hint: str = field(metadata={"help": "which file the user needs and where it goes"})
    mean: tuple[float, float, float] = field(metadata={"help": "per-channel mean on [0, 1] pixels"})
    std: tuple[float, float, float] = field(metadata={"help": "per-channel std on [0, 1] pixels"})
    image_size: int = field(metadata={"help": "input side fed to the backbone (capped by the model's own)"})
    default_config: dict = field(metadata={"help": "config of the released model, for shape-only files"})
    heads_by_width: dict = field(metadata={"help": "attention heads of known widths of this family"})


BACKBONES: dict[str, BackboneSpec] = {
    "dino_vits16": BackboneSpec(
        family="vit",
        description="DINO ViT-S/16",
        file_hint="the transformers folder of facebook/dino-vits16 (config.json + model.safetensors) "
        "or its model.safetensors alone",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        image_size=224,
        default_config=dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                            intermediate_size=1536, patch_size=16, image_size=224,
                            layer_norm_eps=1e-12, qkv_bias=True, hidden_act="gelu"),
        heads_by_width={192: 3, 384: 6, 768: 12, 1024: 16},
    ),
    "dinov2_vitl14": BackboneSpec(
        family="dinov2",
        description="DINOv2 ViT-L/14",
        file_hint="the transformers folder of facebook/dinov2-large (config.json + model.safetensors) "
        "or its model.safetensors alone",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        image_size=224,  # the paper feeds 224; DINOv2 interpolates its 518-px position grid
        default_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                            mlp_ratio=4, patch_size=14, image_size=518, layer_norm_eps=1e-6,
                            layerscale_value=1.0, qkv_bias=True, hidden_act="gelu"),
        heads_by_width={384: 6, 768: 12, 1024: 16, 1536: 24},
    ),
    "clip_vit_h14": BackboneSpec(
        family="clip",
        description="CLIP ViT-H/14 image encoder",
        file_hint="ComfyUI's models/clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors, or the "
        "IP-Adapter models/image_encoder folder (config.json + model.safetensors)",
        mean=CLIP_MEAN,
        std=CLIP_STD,
        image_size=224,
        default_config=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                            intermediate_size=5120, patch_size=14, image_size=224,
                            projection_dim=1024, layer_norm_eps=1e-5, hidden_act="gelu"),
        heads_by_width={768: 12, 1024: 16, 1280: 16, 1664: 16},
    ),
}

_MODEL_CLASSES = {"vit": ViTModel, "dinov2": Dinov2Model, "clip": CLIPVisionModelWithProjection}
_CONFIG_CLASSES = {"vit": ViTConfig, "dinov2": Dinov2Config, "clip": CLIPVisionConfig}
_MODEL_TYPES = {"vit": ("vit",), "dinov2": ("dinov2",), "clip": ("clip", "clip_vision_model")}
# The tensor that locates the model inside a state dict whatever prefix it was saved under.
_ANCHORS = {
    "vit": "embeddings.patch_embeddings.projection.weight",
    "dinov2": "embeddings.patch_embeddings.projection.weight",
    "clip": "embeddings.patch_embedding.weight",
}
_OPTIONAL_KEYS = {"embeddings.mask_token"}  # DINOv2's masking token: unused without masks


def get_backbone_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``; an unknown name raises listing the valid ones."""
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; valid names: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


class FrozenBackbone(nn.Module):
    """A frozen vision model behind a fixed preprocessing: [-1, 1] images -> (B, feature_dim).

    Parameters have ``requires_grad=False`` and the model stays in eval mode even when a parent
    calls ``.train()``. Gradients flow to the input images only. Features come back in float32
    whatever the backbone's dtype, so the trainable heads can stay float32.
    """

    def __init__(self, name: str, model: nn.Module, *, image_size: int,
                 mean: tuple[float, float, float], std: tuple[float, float, float]):
        super().__init__()
        self.name = name
        self.family = get_backbone_spec(name).family
        self.image_size = image_size
        self.model = model.eval().requires_grad_(False)
        # Non-persistent: derived from the registry, so they never bloat a saved state dict.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        config = model.config
        self.feature_dim = config.projection_dim if self.family == "clip" else config.hidden_size

    def train(self, mode: bool = True) -> "FrozenBackbone":
        super().train(mode)
        self.model.eval()  # frozen statistics and no dropout, whatever the parent does
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 3, S, S) normalized, in the model's dtype.

        Non-square inputs are resized to a square (no crop): the training images are square.
        """
        x = (images.float() + 1.0) / 2.0  # (B, 3, H, W) in [0, 1]
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)  # (B, 3, S, S)
        x = (x - self.mean.float()) / self.std.float()
        return x.to(next(self.model.parameters()).dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise BackboneError(f"{self.name} expects (B, 3, H, W) images in [-1, 1], "
                                f"got shape {tuple(images.shape)}")
        out = self.model(pixel_values=self.preprocess(images))
        if self.family == "clip":
            features = out.image_embeds  # (B, projection_dim)
        else:
            features = out.last_hidden_state[:, 0]  # (B, hidden): CLS token after the final norm
        return features.float()


def load_backbone(name: str, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> FrozenBackbone:
    """Load the registered backbone ``name`` from a local transformers folder or .safetensors file.

    Never downloads. Raises :class:`BackboneError` for an unknown name, a missing path, a file
    of the wrong kind, or weights that do not fit the inferred config.
    """
    spec = get_backbone_spec(name)
    path = Path(path)
    if not path.exists():
        raise BackboneError(f"{spec.description} weights not found at {path}; "
                            f"the {name!r} discriminator needs {spec.file_hint}")
    if path.is_dir():
        model = _load_folder(spec, path)
    elif path.suffix == ".safetensors":
        model = _load_single_file(spec, path)
    else:
        raise BackboneError(f"{path} is neither a folder nor a .safetensors file; "
                            f"the {name!r} discriminator needs {spec.file_hint}")
    image_size = min(spec.image_size, _side(model.config.image_size))
    backbone = FrozenBackbone(name, model, image_size=image_size, mean=spec.mean, std=spec.std)
    return backbone.to(device=device, dtype=dtype)


def _side(size: int | tuple | list) -> int:
    return int(size if isinstance(size, int) else size[0])


def _load_folder(spec: BackboneSpec, folder: Path) -> nn.Module:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise BackboneError(f"{folder} has no config.json; the {spec.description} folder needs "
                            f"config.json + model.safetensors ({spec.file_hint})")
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    if not any((folder / w).is_file() for w in weights):
        raise BackboneError(f"{folder} has config.json but no model.safetensors; "
                            f"put the {spec.description} weights there ({spec.file_hint})")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    if model_type not in _MODEL_TYPES[spec.family]:
        raise BackboneError(f"{folder} holds a {model_type!r} model, not {spec.description} "
                            f"(expected model_type {' or '.join(_MODEL_TYPES[spec.family])})")
    extra = {"add_pooling_layer": False} if spec.family == "vit" else {}  # CLS is read, not the pooler
    try:
        return _MODEL_CLASSES[spec.family].from_pretrained(str(folder), local_files_only=True, **extra)
    except (OSError, ValueError, RuntimeError) as err:
        raise BackboneError(f"could not load {spec.description} from {folder}: {err}") from err


def _load_single_file(spec: BackboneSpec, file: Path) -> nn.Module:
    with open_safetensors(file, BackboneError, f"give the {spec.description} weights ({spec.file_hint})") as f:
        renames = _normalize_keys(spec, file, list(f.keys()))  # transformers key -> key in the file
        shapes = {new: tuple(f.get_slice(old).get_shape()) for new, old in renames.items()}
        config = infer_config(spec, shapes, source=str(file))
        state = {new: f.get_tensor(old) for new, old in renames.items()}
    # from_pretrained (not load_state_dict): it maps the saved key layout onto the module layout
    # of the installed transformers version (they differ in v5) and skips random init.
    extra = {"add_pooling_layer": False} if spec.family == "vit" else {}
    try:
        model, info = _MODEL_CLASSES[spec.family].from_pretrained(
            None, config=config, state_dict=state, local_files_only=True, output_loading_info=True, **extra)
    except (OSError, ValueError, RuntimeError) as err:
        raise BackboneError(f"{file} does not fit {spec.description}: {err}; use {spec.file_hint}") from err
    missing = sorted(k for k in info["missing_keys"] if k not in _OPTIONAL_KEYS)
    mismatched = [k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", ())]
    problems = missing + sorted(mismatched)
    if problems:
        raise BackboneError(f"{file} lacks or mis-sizes {len(problems)} weights of {spec.description} "
                            f"(e.g. {', '.join(problems[:3])}); use {spec.file_hint}")
    return model


def _normalize_keys(spec: BackboneSpec, file: Path, keys: list[str]) -> dict[str, str]:
    """Map the transformers key names the model expects to the file's own key names.

    Files may carry an extra prefix (``vit.``, ``dinov2.``, a full CLIP model's ``text_model.*``
    beside ``vision_model.*``), which is stripped or skipped here.
    """
    anchor = _ANCHORS[spec.family]
    hits = sorted((k for k in keys if k.endswith(anchor)), key=len)
    if spec.family == "clip":
        hits = [k for k in hits if "text_model" not in k]
    if not hits:
        hint = ""
        if any(k.startswith(("visual.", "blocks.", "patch_embed.")) for k in keys):
            hint = " It looks like an OpenCLIP/timm layout, which is not supported;"
        raise BackboneError(f"{file} is not a transformers {spec.description} state dict (no "
                            f"'{anchor}' tensor).{hint} use {spec.file_hint}")
    root = hits[0][: -len(anchor)]  # e.g. "", "vit.", "vision_model.", "clip.vision_model."
    if spec.family != "clip":
        return {k[len(root):]: k for k in keys if k.startswith(root)}
    renames = {"vision_model." + k[len(root):]: k for k in keys if k.startswith(root)}
    outer = root[: -len("vision_model.")] if root.endswith("vision_model.") else root
    projection = [k for k in keys if k == outer + "visual_projection.weight"]
    projection = projection or [k for k in keys if k.endswith("visual_projection.weight")]
    if not projection:
        raise BackboneError(f"{file} has the CLIP vision tower but no visual_projection.weight, so it "
                            f"cannot produce image_embeds; use {spec.file_hint}")
    renames["visual_projection.weight"] = projection[0]
    return renames


def infer_config(spec: BackboneSpec | str, shapes: Mapping[str, tuple[int, ...]], *,
                 source: str = "the state dict") -> PretrainedConfig:
    """Rebuild a transformers config from tensor shapes (keys already in transformers layout).

    Width, depth, MLP size, patch size, image size (sqrt of the position count × patch) and
    projection size come from shapes. Head count and activation do not show in any shape: the
    released model's config gives them when the width matches it, ``heads_by_width`` for other
    known widths, and otherwise head dim 64 (one head if the width does not divide by 64) with
    a warning, since a wrong head count still loads but computes different features.
    """
    spec = get_backbone_spec(spec) if isinstance(spec, str) else spec
    try:
        values = _infer_values(spec, shapes, source)
    except KeyError as err:
        raise BackboneError(f"{source} lacks the tensor {err.args[0]!r} of {spec.description}; "
                            f"the file is incomplete or another model; use {spec.file_hint}") from None
    return _CONFIG_CLASSES[spec.family](**values)


def _infer_values(spec: BackboneSpec, shapes: Mapping[str, tuple[int, ...]], source: str) -> dict:
    prefix = "vision_model." if spec.family == "clip" else ""
    layer_word = "layers" if spec.family == "clip" else "layer"
    layer_re = re.compile(rf"^{re.escape(prefix)}encoder\.{layer_word}\.(\d+)\.")
    layer_ids = {int(m.group(1)) for k in shapes if (m := layer_re.match(k))}
    if not layer_ids:
        raise BackboneError(f"{source} has no transformer layers of {spec.description}; "
                            f"use {spec.file_hint}")
    patch_key = prefix + _ANCHORS[spec.family]
    width, _channels, patch, _ = shapes[patch_key]
    if spec.family == "clip":
        positions = shapes["vision_model.embeddings.position_embedding.weight"][0] - 1
    else:
        positions = shapes["embeddings.position_embeddings"][1] - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise BackboneError(f"{source}: {positions} position embeddings is not a square grid")

    default = spec.default_config
    values = dict(default, hidden_size=width, num_hidden_layers=max(layer_ids) + 1,
                  patch_size=patch, image_size=grid * patch)
    first = f"{prefix}encoder.{layer_word}.0."
    if spec.family == "clip":
        values["intermediate_size"] = shapes[first + "mlp.fc1.weight"][0]
        values["projection_dim"] = shapes["visual_projection.weight"][0]
    elif spec.family == "vit":
        values["intermediate_size"] = shapes[first + "intermediate.dense.weight"][0]
        values["qkv_bias"] = first + "attention.attention.query.bias" in shapes
    else:
        if "embeddings.register_tokens" in shapes:
            raise BackboneError(f"{source} is DINOv2 with registers, which {spec.description} "
                                f"does not cover; use {spec.file_hint}")
        swiglu = first + "mlp.weights_in.weight" in shapes
        values["use_swiglu_ffn"] = swiglu
        if not swiglu:
            mlp = shapes[first + "mlp.fc1.weight"][0]
            if mlp % width:
                raise BackboneError(f"{source}: MLP width {mlp} is not a whole multiple of {width}, "
                                    f"which DINOv2 configs cannot express; use {spec.file_hint}")
            values["mlp_ratio"] = mlp // width
        values["qkv_bias"] = first + "attention.attention.query.bias" in shapes

    if width == default["hidden_size"]:
        heads = default["num_attention_heads"]
    elif width in spec.heads_by_width:
        heads = spec.heads_by_width[width]
    else:
        heads = width // 64 if width % 64 == 0 else 1
        warnings.warn(f"{source}: width {width} is not a known {spec.description} size; guessing "
                      f"{heads} attention head(s) and hidden_act={values['hidden_act']!r}. Load the "
                      f"transformers folder with its config.json to be exact.", stacklevel=5)
    values["num_attention_heads"] = heads
    return values
