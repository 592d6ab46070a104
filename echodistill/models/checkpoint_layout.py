"""Key layouts of single-file Stable Diffusion checkpoints, mapped to diffusers/transformers names.

One table per component says where each diffusers parameter lives in an original ("LDM")
checkpoint. The same table serves loading (file -> diffusers) and writing (diffusers -> file),
so the two directions cannot drift apart.

Layouts:
- ``ldm``: ``model.diffusion_model.*`` UNet, ``first_stage_model.*`` VAE, and the text tower
  under ``cond_stage_model.transformer.*`` (CLIP ViT-L, SD 1.x) or ``cond_stage_model.model.*``
  (OpenCLIP ViT-H, SD 2.x).
- ``sgm``: as ``ldm`` but the OpenCLIP text tower under ``conditioner.embedders.0.model.*``
  (SD-Turbo's files); or, for SDXL (text kind ``sdxl``), two towers: CLIP ViT-L under
  ``conditioner.embedders.0.transformer.text_model.*`` (transformers names) and OpenCLIP ViT-bigG
  under ``conditioner.embedders.1.model.*`` (fused ``in_proj`` q/k/v and a ``text_projection``
  stored as (in, out), the transpose of transformers' ``text_projection.weight``). The SDXL UNet
  adds ``label_emb.0.0`` / ``label_emb.0.2`` (diffusers' ``add_embedding.linear_1`` / ``linear_2``).
  These are the key names of Stability AI's published SDXL base / SDXL-Turbo files, which is what
  ComfyUI's checkpoint loader recognises SDXL by.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping

import torch

from ..errors import ModelLoadError

Layout = Literal["ldm", "sgm"]
TextKind = Literal["clip", "openclip", "sdxl"]  # "sdxl": the two towers below, in one file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES: dict[tuple[Layout, TextKind], str] = {
    ("ldm", "clip"): "cond_stage_model.transformer.text_model.",
    ("ldm", "openclip"): "cond_stage_model.model.",
    ("sgm", "openclip"): "conditioner.embedders.0.model.",
}
# SDXL single files (layout "sgm", text kind "sdxl"): diffusers component -> (tower kind, key prefix).
SDXL_TEXT_TOWERS: dict[str, tuple[TextKind, str]] = {
    "text_encoder": ("clip", "conditioner.embedders.0.transformer.text_model."),
    "text_encoder_2": ("openclip", "conditioner.embedders.1.model."),
}

TOWER_NAMES = {"text_encoder": "CLIP ViT-L text encoder", "text_encoder_2": "OpenCLIP ViT-bigG text encoder"}
# key prefix -> the part of the model it belongs to, for messages about missing tensors
PART_NAMES: dict[str, str] = {
    UNET_PREFIX: "UNet",
    VAE_PREFIX: "VAE",
    **{prefix: TOWER_NAMES[component] for component, (_, prefix) in SDXL_TEXT_TOWERS.items()},
    **{prefix: "text encoder" for prefix in TEXT_PREFIXES.values()},
    "cond_stage_model.": "text encoder",
}


def part_of(key: str) -> str:
    """Which part of a checkpoint `key` belongs to ("UNet", "VAE", "OpenCLIP ViT-bigG text encoder", ...)."""
    return next((name for prefix, name in PART_NAMES.items() if key.startswith(prefix)), "other tensors")


@dataclass(frozen=True)
class Source:
    """Where one diffusers tensor comes from: a file key, optionally a chunk or a reshape."""

    key: str
    chunk: tuple[int, int] | None = None  # (index, count) along dim 0 (OpenCLIP fused q/k/v)
    conv1x1: bool = False  # file stores a Linear weight as a 1x1 conv (VAE attention)
    transpose: bool = False  # file stores the (in, out) matrix of a Linear weight (OpenCLIP text_projection)

    def read(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.chunk is not None:
            index, count = self.chunk
            tensor = tensor.chunk(count, dim=0)[index]
        if self.conv1x1 and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]
        if self.transpose:
            tensor = tensor.t()
        return tensor


def _split_by_prefix(key: str, table: Mapping[str, str]) -> tuple[str, str] | None:
    """(matched diffusers prefix, remainder of the key) for the longest prefix in `table`."""
    matches = [prefix for prefix in table if key.startswith(prefix)]
    if not matches:
        return None
    prefix = max(matches, key=len)
    return prefix, key[len(prefix) :]


# --- UNet -------------------------------------------------------------------------------------

_UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _unet_prefix_table(config: Mapping) -> dict[str, str]:
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ModelLoadError("single-file UNets with a per-level layers_per_block list are not supported")
    levels = len(config["block_out_channels"])
    table = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    if config.get("addition_embed_type") == "text_time":
        # SDXL's size/crop + pooled-text embedding: Linear, SiLU, Linear in one Sequential.
        table["add_embedding.linear_1."] = "label_emb.0.0."
        table["add_embedding.linear_2."] = "label_emb.0.2."
    for i in range(levels):
        for j in range(per_block):
            index = 1 + i * (per_block + 1) + j
            table[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{index}.0."
            table[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{index}.1."
        if i < levels - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (per_block + 1)}.0.op."
    for i in range(levels):
        has_attention = config["up_block_types"][i].startswith("CrossAttn")
        for j in range(per_block + 1):
            index = i * (per_block + 1) + j
            table[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{index}.0."
            table[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{index}.1."
        if i < levels - 1:
            slot = 2 if has_attention else 1
            table[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (per_block + 1) + per_block}.{slot}."
    return table


def unet_sources(diffusers_keys: Iterable[str], config: Mapping) -> dict[str, Source]:
    table = _unet_prefix_table(config)
    sources = {}
    for key in diffusers_keys:
        match = _split_by_prefix(key, table)
        if match is None:
            raise ModelLoadError(f"UNet parameter {key!r} has no place in the single-file layout")
        prefix, rest = match
        if "resnets" in prefix:
            head, _, tail = rest.partition(".")
            rest = f"{_UNET_RESNET_NAMES.get(head, head)}.{tail}"
        sources[key] = Source(UNET_PREFIX + table[prefix] + rest)
    return sources


# --- VAE --------------------------------------------------------------------------------------

_VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_prefix_table(config: Mapping) -> dict[str, str]:
    levels = len(config["block_out_channels"])
    per_block = config["layers_per_block"]
    table = {
        "quant_conv.": "quant_conv.",
        "post_quant_conv.": "post_quant_conv.",
    }
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in."] = f"{part}.conv_in."
        table[f"{part}.conv_out."] = f"{part}.conv_out."
        table[f"{part}.conv_norm_out."] = f"{part}.norm_out."
        table[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        table[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
        table[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
    for i in range(levels):
        for j in range(per_block):
            table[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        table[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
        # The decoder's levels are stored in reverse order in the original layout.
        for j in range(per_block + 1):
            table[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{levels - 1 - i}.block.{j}."
        table[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{levels - 1 - i}.upsample.conv."
    return table


def vae_sources(diffusers_keys: Iterable[str], config: Mapping) -> dict[str, Source]:
    table = _vae_prefix_table(config)
    sources = {}
    for key in diffusers_keys:
        match = _split_by_prefix(key, table)
        if match is None:
            raise ModelLoadError(f"VAE parameter {key!r} has no place in the single-file layout")
        prefix, rest = match
        conv1x1 = False
        if "attentions" in prefix:
            for name, original in _VAE_ATTENTION_NAMES.items():
                if rest.startswith(name + "."):
                    rest = original + rest[len(name) :]
                    conv1x1 = rest.endswith(".weight") and original != "norm"
                    break
        elif "resnets" in prefix:
            head, _, tail = rest.partition(".")
            rest = f"{_VAE_RESNET_NAMES.get(head, head)}.{tail}"
        sources[key] = Source(VAE_PREFIX + table[prefix] + rest, conv1x1=conv1x1)
    return sources


# --- Text encoders ----------------------------------------------------------------------------

_OPENCLIP_LAYER_NAMES = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}
_QKV_INDEX = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def text_tower(layout: Layout, kind: TextKind, component: str = "text_encoder") -> tuple[TextKind, str]:
    """(tower kind, key prefix) of one text encoder component ("text_encoder" or "text_encoder_2") of a file.

    Raises ModelLoadError when the file's layout has no such tower (e.g. a second tower in SD 2.x).
    """
    if kind == "sdxl":
        if layout != "sgm" or component not in SDXL_TEXT_TOWERS:
            raise ModelLoadError(f"SDXL files ({layout} layout) have no {component} tower")
        return SDXL_TEXT_TOWERS[component]
    if component != "text_encoder" or (layout, kind) not in TEXT_PREFIXES:
        raise ModelLoadError(f"no {kind} {component} exists in the {layout} layout")
    return kind, TEXT_PREFIXES[(layout, kind)]


def text_sources(
    diffusers_keys: Iterable[str], layout: Layout, kind: TextKind, component: str = "text_encoder"
) -> dict[str, Source]:
    """Sources of a transformers `CLIPTextModel` / `CLIPTextModelWithProjection` state dict (keys with or
    without `text_model.`) for the file's `component` tower (see `text_tower`)."""
    kind, prefix = text_tower(layout, kind, component)
    sources = {}
    for key in diffusers_keys:
        bare = key.removeprefix("text_model.")
        if kind == "clip":
            sources[key] = Source(prefix + bare)
            continue
        sources[key] = _openclip_source(prefix, bare, key)
    return sources


def _openclip_source(prefix: str, bare: str, key: str) -> Source:
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    if bare in fixed:
        return Source(prefix + fixed[bare])
    if bare == "text_projection.weight":  # CLIPTextModelWithProjection (SDXL's second tower)
        return Source(prefix + "text_projection", transpose=True)
    parts = bare.split(".")  # encoder.layers.N.<rest>
    if parts[:2] != ["encoder", "layers"]:
        raise ModelLoadError(f"text encoder parameter {key!r} has no place in the OpenCLIP layout")
    layer, rest = parts[2], ".".join(parts[3:])
    block = f"{prefix}transformer.resblocks.{layer}."
    if rest.startswith("self_attn.") and rest.split(".")[1] in _QKV_INDEX:
        projection, kind = rest.split(".")[1], rest.split(".")[2]  # q_proj, weight|bias
        return Source(f"{block}attn.in_proj_{kind}", chunk=(_QKV_INDEX[projection], 3))
    for name, original in _OPENCLIP_LAYER_NAMES.items():
        if rest.startswith(name):
            return Source(block + original + rest[len(name) :])
    raise ModelLoadError(f"text encoder parameter {key!r} has no place in the OpenCLIP layout")


# --- Both directions --------------------------------------------------------------------------


def gather(sources: Mapping[str, Source], weights) -> dict[str, torch.Tensor]:
    """Read every source from `weights` (a TensorFile), each fused tensor only once."""
    cache: dict[str, torch.Tensor] = {}
    state = {}
    missing = sorted({s.key for s in sources.values() if s.key not in weights})
    if missing:
        counted = ", ".join(f"{count} of the {part}" for part, count in Counter(map(part_of, missing)).items())
        name = getattr(getattr(weights, "path", None), "name", "the checkpoint")
        raise ModelLoadError(
            f"{name} lacks {len(missing)} tensors its family's config expects ({counted}; e.g. {missing[0]}): a cut "
            "or partial file, or a file of another family. Give the whole checkpoint, or pick the family it was "
            "made for."
        )
    for name, source in sources.items():
        if source.chunk is not None:
            if source.key not in cache:
                cache[source.key] = weights.get(source.key)
            state[name] = source.read(cache[source.key])
        else:
            state[name] = source.read(weights.get(source.key))
    return state


def scatter(sources: Mapping[str, Source], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `gather`: diffusers tensors -> single-file tensors (fused q/k/v re-joined)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for name, source in sources.items():
        tensor = state[name]
        if source.chunk is not None:
            fused.setdefault(source.key, {})[source.chunk[0]] = tensor
            continue
        if source.conv1x1 and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        if source.transpose:
            tensor = tensor.t().contiguous()
        out[source.key] = tensor
    for key, parts in fused.items():
        out[key] = torch.cat([parts[i] for i in sorted(parts)], dim=0)
    return out
