"""The mini world's model shapes, and writing them as diffusers folders that load_model_pair reads.

Same classes as SD 2.1 / SD-Turbo, sized for a 2-core CPU and a 40 MB package, and faithful to SD
where personalization happens (cross-attention K/V, the text states they read):
  * VAE (AutoencoderKL): 3 levels, 64×64×3 pixels -> 16×16×4 latents (4× downscale; at 8× a
    4-pixel stripe would be half a latent cell and the decoder would have to invent it).
  * text encoder (CLIPTextModel): the real 49408-token CLIP vocabulary, 128 wide, 3 layers. A
    48-wide encoder could not carry a subject: a concept learnt in the cross-attention K/V of a
    48-wide reader fitted its training prompt and did not carry to new contexts (docs/quality.md).
    The token table is most of its 7M parameters (14 MB in fp16), stored once: the teacher's and
    the student's copies are the same file.
  * UNet2DConditionModel (teacher and student alike, as SD-Turbo shares SD 2.1's UNet):
    16 -> 8 -> 4 -> 2 with cross-attention at 16×16, 8×8 and 4×4 and in the mid block, as SD 2.1
    has it at every level but the lowest (64, 32, 16; not 8) plus the mid block: a subject's
    detail lives at the highest level, so its K/V must be there. 5.1M parameters.
The teacher folder carries SD 2.1 base's DDIM scheduler config, the student's SD-Turbo's Euler
"trailing" one; both carry identical copies of the text encoder and the VAE.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..files import give_plain_modes
from ..models.families import CONFIG_ROOT
from .paths import (  # noqa: F401 - the shipped world's paths are read from here too
    ASSET_ROOT,
    MODEL_ROOT,
    ORACLE_ROOT,
    SHIPPED_CONCEPT_DIR,
    STUDENT_DIR,
    TEACHER_DIR,
)

SHIPPED_PREFIX = "miniworld/"  # how the loaders, the command line and fleet manifests name the shipped pair
SHIPPED_MODELS: dict[str, Path] = {f"{SHIPPED_PREFIX}{folder.name}": folder for folder in (TEACHER_DIR, STUDENT_DIR)}


def shipped_model(name: str) -> Path | None:
    """The folder of `miniworld/teacher|student`, or None for any other name (a path).

    Raises ValueError for another `miniworld/...` name that is not a path either.
    """
    if not name.startswith(SHIPPED_PREFIX) or Path(name).exists():
        return None
    if name not in SHIPPED_MODELS:
        raise ValueError(f"{name!r} is not a shipped model; shipped: {', '.join(sorted(SHIPPED_MODELS))}")
    return SHIPPED_MODELS[name]


FAMILY_OF_ROLE = {"teacher": "sd21-base", "student": "sd-turbo"}  # whose scheduler and model_index

TEXT_WIDTH = 128

VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [16, 32, 48],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 1.0,  # replaced after training by 1 / std of the latents, as SD's 0.18215 was chosen
}

TEXT_CONFIG: dict = {
    "architectures": ["CLIPTextModel"],
    "hidden_size": TEXT_WIDTH,
    "intermediate_size": 4 * TEXT_WIDTH,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "gelu",  # OpenCLIP's, as SD 2.x: tells the loader to pad the sd2 way
    "projection_dim": TEXT_WIDTH,
    # SD 2.1's text_encoder/config.json has these ids too; the pipelines read last_hidden_state only.
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

UNET_CONFIG: dict = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [48, 64, 96, 128],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",  # diffusers' default, named: SD 2.1 attends in its mid block too
    "cross_attention_dim": TEXT_WIDTH,
    "attention_head_dim": 4,  # diffusers reads this as the number of heads, as SD 2.1's config does
    "use_linear_projection": True,  # as SD 2.x
    "norm_num_groups": 16,
}


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(**VAE_CONFIG)


def build_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**UNET_CONFIG)


def _half_copy(module: torch.nn.Module) -> torch.nn.Module:
    """An fp16 copy to save: the shipped files are half the size, training stays in fp32."""
    return copy.deepcopy(module).half().eval()


def write_model_folder(
    folder: Path, role: str, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, vae: AutoencoderKL
) -> Path:
    """Write a diffusers folder (fp16 safetensors) for `role`, replacing `folder` atomically.

    Everything goes into a sibling temporary folder first and is renamed into place, so a
    crash never leaves a half-written model where the loader looks.
    """
    family = CONFIG_ROOT / FAMILY_OF_ROLE[role]
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for name, module in (("unet", unet), ("text_encoder", text_encoder), ("vae", vae)):
            _half_copy(module).save_pretrained(staging / name, safe_serialization=True)
        (staging / "scheduler").mkdir()
        shutil.copyfile(family / "scheduler" / "scheduler_config.json", staging / "scheduler" / "scheduler_config.json")
        shutil.copyfile(family / "model_index.json", staging / "model_index.json")
        give_plain_modes(staging)
        replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def replace_folder(staging: Path, folder: Path) -> None:
    """Put `staging` where `folder` is: rename the old one aside, rename the new one in, drop the old."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(staging, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def folder_size(folder: Path) -> int:
    """Bytes of every file under `folder`."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def read_config(folder: Path, component: str) -> dict:
    return json.loads((Path(folder) / component / "config.json").read_text())
