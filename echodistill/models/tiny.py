"""Tiny random Stable-Diffusion-shaped models, written in every format the loaders accept.

The classes are the real ones (UNet2DConditionModel with SD's 4 levels, AutoencoderKL with an
8x downscale, CLIPTextModel with the real 49408-token vocabulary); only the widths are small.
They serve the test suite and the smoke run of `echodistill demo`: the code path is exactly
the one real checkpoints take, in seconds on a CPU.

SDXL-shaped ones too (`build_tiny_sdxl_pair`): a 3-level UNet with SDXL's block types, several
transformer layers per block and `addition_embed_type="text_time"`, a CLIP ViT-L-like
`CLIPTextModel` and an OpenCLIP-bigG-like `CLIPTextModelWithProjection`, written as diffusers
folders or as SGM single files with the key names of Stability AI's SDXL files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..files import give_plain_modes
from . import checkpoint_layout as layout_map
from .families import CONFIG_ROOT
from .tensor_files import atomic_save_safetensors


def unet_config(context_dim: int = 32) -> dict:
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [32, 32, 64, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": context_dim,
        "attention_head_dim": [2, 2, 4, 4],
        "use_linear_projection": True,
        "norm_num_groups": 8,
    }


VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [8, 16, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 8,
    "sample_size": 128,
    "scaling_factor": 0.18215,
}


def text_config(hidden: int = 32, act: str = "gelu") -> dict:
    return {
        "architectures": ["CLIPTextModel"],
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "hidden_act": act,
        "projection_dim": hidden,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


# Tiny stand-ins for the shipped families: same scheduler configs, tiny networks.
TINY_FAMILIES = {
    "tiny-sd21": ("sd21-base", 32, "gelu"),
    "tiny-sd21v": ("sd21-768v", 32, "gelu"),
    "tiny-turbo": ("sd-turbo", 32, "gelu"),
    "tiny-sd15": ("sd15", 24, "quick_gelu"),
}


# Tiny SDXL: the two towers' widths (CLIP ViT-L-like, bigG-like) and the size/crop embedding width.
SDXL_TEXT_WIDTHS = (24, 32)
SDXL_TIME_EMBED_DIM = 8


def sdxl_unet_config() -> dict:
    """SDXL's UNet layout (Down, CrossAttnDown, CrossAttnDown; 1, 1, 2 transformer layers; text_time added
    conditioning) at tiny widths; cross-attention = the two text widths summed, as in SDXL (768 + 1280)."""
    clip_l, clip_g = SDXL_TEXT_WIDTHS
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 1, 2],
        "cross_attention_dim": clip_l + clip_g,
        "attention_head_dim": [2, 4, 4],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": clip_g + 6 * SDXL_TIME_EMBED_DIM,  # pooled + 6 size/crop ids
        "norm_num_groups": 8,
    }


def sdxl_text_configs() -> tuple[dict, dict]:
    """(text_encoder, text_encoder_2) configs: quick_gelu CLIP-L-like, gelu bigG-like with a projection."""
    clip_l, clip_g = SDXL_TEXT_WIDTHS
    second = {**text_config(clip_g, "gelu"), "architectures": ["CLIPTextModelWithProjection"]}
    return text_config(clip_l, "quick_gelu"), second


TINY_SDXL_FAMILIES = {"tiny-sdxl": "sdxl-base", "tiny-sdxl-turbo": "sdxl-turbo"}


def write_family(root: Path, name: str) -> Path:
    """A config folder like the shipped ones, with tiny networks."""
    if name in TINY_SDXL_FAMILIES:
        return _write_sdxl_family(root, name)
    shipped, hidden, act = TINY_FAMILIES[name]
    folder = root / name
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        (folder / part).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CONFIG_ROOT / shipped / "model_index.json", folder / "model_index.json")
    shutil.copyfile(
        CONFIG_ROOT / shipped / "scheduler" / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json"
    )
    (folder / "unet" / "config.json").write_text(json.dumps(unet_config(hidden)))
    (folder / "vae" / "config.json").write_text(json.dumps(VAE_CONFIG))
    (folder / "text_encoder" / "config.json").write_text(json.dumps(text_config(hidden, act)))
    return folder


def _write_sdxl_family(root: Path, name: str) -> Path:
    shipped = TINY_SDXL_FAMILIES[name]
    folder = root / name
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        (folder / part).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CONFIG_ROOT / shipped / "model_index.json", folder / "model_index.json")
    shutil.copyfile(
        CONFIG_ROOT / shipped / "scheduler" / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json"
    )
    first, second = sdxl_text_configs()
    (folder / "unet" / "config.json").write_text(json.dumps(sdxl_unet_config()))
    (folder / "vae" / "config.json").write_text(json.dumps({**VAE_CONFIG, "scaling_factor": 0.13025}))
    (folder / "text_encoder" / "config.json").write_text(json.dumps(first))
    (folder / "text_encoder_2" / "config.json").write_text(json.dumps(second))
    return folder


def build_models(family: Path, seed: int) -> dict[str, torch.nn.Module]:
    """Random modules for a family folder; non-zero norms/biases so every tensor is distinctive.

    Keys "unet", "vae", "text_encoder", and for an SDXL family "text_encoder_2" (a CLIPTextModelWithProjection).
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(json.loads((family / "unet" / "config.json").read_text()))
    vae = AutoencoderKL.from_config(json.loads((family / "vae" / "config.json").read_text()))
    models = {"unet": unet, "vae": vae}
    models["text_encoder"] = CLIPTextModel(
        CLIPTextConfig(**json.loads((family / "text_encoder" / "config.json").read_text()))
    )
    if (family / "text_encoder_2" / "config.json").is_file():
        models["text_encoder_2"] = CLIPTextModelWithProjection(
            CLIPTextConfig(**json.loads((family / "text_encoder_2" / "config.json").read_text()))
        )
    for module in models.values():
        with torch.no_grad():
            for param in module.parameters():
                param.add_(torch.randn_like(param) * 0.02)
        module.requires_grad_(False)  # frozen like loaded base models: no gradients for frozen weights
        module.eval()
    return models


def write_diffusers_folder(models: dict, folder: Path, family: Path) -> Path:
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # "Writing model shards" bars for a tiny model: noise on screen
    try:
        for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if part in models:
                models[part].save_pretrained(folder / part, safe_serialization=True)
                give_plain_modes(folder / part)  # safetensors' writer makes its files 0600
    finally:
        if shown:
            transformers_logging.enable_progress_bar()
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(family / "scheduler" / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
    shutil.copyfile(family / "model_index.json", folder / "model_index.json")
    return folder


def single_file_state(models: dict, family: Path, layout: str, text_kind: str, with_text: bool = True) -> dict:
    unet_cfg = json.loads((family / "unet" / "config.json").read_text())
    state = layout_map.scatter(
        layout_map.unet_sources(models["unet"].state_dict(), unet_cfg), models["unet"].state_dict()
    )
    vae_state = models["vae"].state_dict()
    state.update(layout_map.scatter(layout_map.vae_sources(vae_state, VAE_CONFIG), vae_state))
    if with_text and text_kind == "sdxl":
        state.update(_sdxl_text_state(models))
    elif with_text:
        # Flat key names whatever the transformers version (4.x prefixes them with `text_model.`).
        text_state = {
            k.removeprefix("text_model."): v
            for k, v in models["text_encoder"].state_dict().items() if not k.endswith("position_ids")
        }
        state.update(layout_map.scatter(layout_map.text_sources(text_state, layout, text_kind), text_state))
        if text_kind == "openclip":
            # Real OpenCLIP files carry one more layer (diffusers drops it) and the projection.
            prefix = layout_map.TEXT_PREFIXES[(layout, text_kind)]
            for key in [k for k in state if k.startswith(f"{prefix}transformer.resblocks.1.")]:
                state[key.replace("resblocks.1.", "resblocks.2.")] = state[key].clone()
            width = text_state["final_layer_norm.weight"].shape[0]
            state[f"{prefix}text_projection"] = torch.randn(width, width)
            state[f"{prefix}logit_scale"] = torch.tensor(4.6)
    return state


def _sdxl_text_state(models: dict) -> dict:
    """Both towers under SGM's SDXL keys: CLIP ViT-L at conditioner.embedders.0.transformer.text_model.*,
    bigG at conditioner.embedders.1.model.* (fused in_proj, text_projection stored (in, out), logit_scale)."""
    state = {}
    for component in ("text_encoder", "text_encoder_2"):
        text_state = {
            k.removeprefix("text_model."): v
            for k, v in models[component].state_dict().items() if not k.endswith("position_ids")
        }
        state.update(layout_map.scatter(layout_map.text_sources(text_state, "sgm", "sdxl", component), text_state))
    _, prefix = layout_map.SDXL_TEXT_TOWERS["text_encoder_2"]
    state[f"{prefix}logit_scale"] = torch.tensor(4.6052)  # ln(100), as OpenCLIP saves it; no reader uses it
    return state


def write_single_file(
    models: dict,
    path: Path,
    family: Path,
    layout: str,
    text_kind: str,
    metadata: dict | None = None,
    with_text: bool = True,
) -> Path:
    state = single_file_state(models, family, layout, text_kind, with_text)
    return atomic_save_safetensors(state, path, metadata)


def build_tiny_pair(root: Path) -> dict:
    """Tiny teacher (SD 2.1-like) and student (SD-Turbo-like) sharing text encoder and VAE weights."""
    families = {name: write_family(root / "families", name) for name in TINY_FAMILIES}
    models = {
        "teacher": build_models(families["tiny-sd21"], seed=1),
        "student": build_models(families["tiny-turbo"], seed=2),
    }
    # SD-Turbo shares SD 2.1's text encoder and VAE: the student's copies are the teacher's.
    models["student"]["text_encoder"].load_state_dict(models["teacher"]["text_encoder"].state_dict())
    models["student"]["vae"].load_state_dict(models["teacher"]["vae"].state_dict())
    return {"root": root, "families": families, "models": models}


def build_tiny_sdxl_pair(root: Path) -> dict:
    """Tiny SDXL teacher (SDXL base-like) and student (SDXL-Turbo-like) sharing both text encoders and the VAE.

    Returns {"root", "families": {"tiny-sdxl", "tiny-sdxl-turbo"}, "models": {"teacher", "student"}}, each
    models entry as `build_models` gives it. Write them with `write_diffusers_folder` or, in the SGM layout,
    `write_single_file(models, path, family, "sgm", "sdxl", metadata)`.
    """
    families = {name: write_family(root / "families", name) for name in TINY_SDXL_FAMILIES}
    models = {
        "teacher": build_models(families["tiny-sdxl"], seed=11),
        "student": build_models(families["tiny-sdxl-turbo"], seed=12),
    }
    # SDXL-Turbo keeps SDXL base's text encoders and VAE: the student's copies are the teacher's.
    for part in ("text_encoder", "text_encoder_2", "vae"):
        models["student"][part].load_state_dict(models["teacher"][part].state_dict())
    return {"root": root, "families": families, "models": models}
