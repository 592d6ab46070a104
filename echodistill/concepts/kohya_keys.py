"""Where an exported weight goes: the kohya key of each UNet module, and the UNet it must fit.

Two spellings of one module, both read by ComfyUI for every UNet (comfy/lora.py
``model_lora_keys_unet`` maps ``lora_unet_<LDM path>`` from the model's own state dict and
``lora_unet_<diffusers path>`` through ``comfy.utils.unet_to_diffusers``):

- SD 1.x / 2.x exports use the diffusers module path, as kohya's sd-scripts writes SD 1.x / 2.x
  LoRAs: ``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k``.
- SDXL exports use the SGM / LDM module path of Stability AI's single files, as sd-scripts writes
  SDXL LoRAs (it trains SDXL on that UNet) and A1111/Forge read them:
  ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k``, ``lora_unet_middle_block_1_…``,
  ``lora_unet_output_blocks_3_1_…``. diffusers' ``load_lora_weights`` maps these back with its
  ``_maybe_map_sgm_blocks_to_diffusers`` (it reads ``layers_per_block`` from the pipeline's UNet).

The SGM paths are read from `models.checkpoint_layout`'s UNet table, the one table that loads and
writes single files, so a LoRA key and the checkpoint weight it patches cannot disagree.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from ..errors import EchoDistillError, ModelLoadError
from ..models.checkpoint_layout import UNET_PREFIX, unet_sources
from ..models.families import SDXL_FAMILIES, family_config, unet_config_problems

KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha", "diff", "diff_b")


class ExportError(EchoDistillError):
    """A bundle cannot be exported as asked, or a kohya state dict does not fit a UNet."""


def kohya_key(module_name: str) -> str:
    """``down_blocks.0.….attn2.to_k`` -> ``lora_unet_down_blocks_0_…_attn2_to_k`` (any module path)."""
    return KOHYA_UNET_PREFIX + module_name.replace(".", "_")


def is_sdxl_unet(unet_config: Mapping) -> bool:
    """The UNet takes SDXL's added conditioning (pooled text + size/crop ids: ``addition_embed_type`` "text_time")."""
    return unet_config.get("addition_embed_type") == "text_time"


def sgm_module_names(modules: Iterable[str], unet_config: Mapping) -> dict[str, str]:
    """diffusers module name -> its SGM / LDM module path in a single file of that UNet, e.g.
    ``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`` -> ``input_blocks.4.1.transformer_blocks.0.attn2.to_k``
    and ``down_blocks.1.resnets.0.conv1`` -> ``input_blocks.4.0.in_layers.2`` (with SDXL's layers_per_block 2).

    Raises ExportError when the layout has no place for a module (or no table for the UNet's config).
    """
    weights = {f"{module}.weight": module for module in modules}
    try:
        sources = unet_sources(weights, unet_config)
    except ModelLoadError as error:
        raise ExportError(f"cannot name the SGM keys of this UNet: {error}") from None
    return {weights[name]: source.key[len(UNET_PREFIX):].removesuffix(".weight") for name, source in sources.items()}


def kohya_keys(modules: Iterable[str], unet_config: Mapping | None, sdxl: bool) -> dict[str, str]:
    """module -> kohya key stem of an export: SGM paths for SDXL (needs `unet_config`), diffusers paths otherwise."""
    modules = list(modules)
    if not sdxl:
        return {module: kohya_key(module) for module in modules}
    if unet_config is None:
        raise ExportError("an SDXL export needs the UNet's config to name its SGM keys")
    return {module: kohya_key(path) for module, path in sgm_module_names(modules, unet_config).items()}


def _kind(sdxl: bool) -> str:
    return "SDXL" if sdxl else "SD 1.x / 2.x"


def _describe(unet_config: Mapping) -> str:
    extra = "with" if is_sdxl_unet(unet_config) else "without"
    return (f"an {_kind(is_sdxl_unet(unet_config))} UNet ({unet_config.get('cross_attention_dim')}-wide "
            f"cross-attention, {extra} SDXL's pooled-text / size conditioning)")


def export_unet_config(sdxl: bool, families: Mapping[str, str], part: str,
                       unet_config: Mapping | nn.Module | None, stored: Mapping | None = None) -> Mapping | None:
    """The diffusers UNet config an export of `part` is named and checked against.

    `unet_config` (a config mapping, or a diffusers UNet whose ``.config`` is read) when given; else the
    config the bundle stored at training (`stored`, ConceptBundle.unet_configs); else, for an SDXL concept
    trained on a shipped family (sdxl-base, sdxl-turbo), that family's UNet config; else None (an SD 1.x /
    2.x bundle saved before configs were stored: its keys are diffusers paths, so it is named without one,
    and not checked). Raises ExportError, in one line naming both, when the config is of the other kind than
    the concept (SDXL vs SD 1.x / 2.x), when the stored one is damaged, and when an SDXL concept of another
    family comes without one.
    """
    config = getattr(unet_config, "config", None) if isinstance(unet_config, nn.Module) else unet_config
    trained = f"{families.get('teacher')} + {families.get('student')}"
    if config is not None:
        if is_sdxl_unet(config) != sdxl:
            raise ExportError(
                f"this is an {_kind(sdxl)} concept (trained on {trained}) but the given UNet config is "
                f"{_describe(config)}: give the config of the UNet it was trained on")
        return config
    family = families.get(part)
    if stored:
        if not isinstance(stored, Mapping) or "block_out_channels" not in stored or is_sdxl_unet(stored) != sdxl:
            raise ExportError(f"the concept's stored {part} UNet config is not the diffusers config of an "
                              f"{_kind(sdxl)} UNet: the file was edited or damaged; pass unet_config= (the config "
                              "of the UNet it was trained on)", parameters=("unet_config",))
        return stored
    if not sdxl:
        return None
    if family in SDXL_FAMILIES:
        return family_config(family).unet
    raise ExportError(
        f"this SDXL concept's {part} family {family!r} is not a shipped one ({', '.join(SDXL_FAMILIES)}) and the "
        "concept was saved without its UNet's config, so its UNet layout is unknown: pass unet_config= (the diffusers "
        "config of the UNet it was trained on), or retrain it with this version, which stores it",
        parameters=("unet_config",))


def check_against_unet(shapes: Mapping[str, tuple[int, ...]], unet_config: Mapping | nn.Module,
                       described: str = "the given UNet", hint: str = "") -> None:
    """Every exported module must be a Linear or conv layer of that UNet with ΔW's shape (built on meta: free).

    Raises ExportError naming the first module that is missing (or else has another shape) and how many more
    do; `described` names the UNet in it, and `hint` ends it.
    """
    if isinstance(unet_config, nn.Module):
        unet = unet_config
    else:
        from diffusers import UNet2DConditionModel

        problems = unet_config_problems(unet_config)  # a "4" would fail in torch as an unrelated formatting error
        if problems:
            raise ExportError(f"the UNet config does not build a diffusers UNet ({'; '.join(problems)}): give the "
                              "config.json of the UNet the concept was trained on")
        try:
            with torch.device("meta"):
                unet = UNet2DConditionModel.from_config(dict(unet_config))
        except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as exc:  # diffusers' checks, torch's
            raise ExportError(f"the UNet config does not build a diffusers UNet ({exc}): give the config.json of "
                              "the UNet the concept was trained on") from None
    linears = {n: m for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    missing = [module for module in shapes if module not in linears]
    if missing:
        more = f" (and {len(missing) - 1} more module(s))" if len(missing) > 1 else ""
        raise ExportError(f"{missing[0]}{more} is not a Linear or conv layer of {described}"
                          f"{hint or ': was the bundle trained on another?'}")
    misshapen = [module for module, shape in shapes.items() if tuple(linears[module].weight.shape) != tuple(shape)]
    if misshapen:
        first = misshapen[0]
        more = f" (and {len(misshapen) - 1} more module(s))" if len(misshapen) > 1 else ""
        raise ExportError(f"{first}{more}: ΔW has shape {tuple(shapes[first])} but {described}'s weight is "
                          f"{tuple(linears[first].weight.shape)}{hint}")
