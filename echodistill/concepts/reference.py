"""A reference applier of kohya LoRA files: patches a plain diffusers UNet the way ComfyUI does.

Strict where ComfyUI is lenient (a key it cannot map is only logged there), so applying an
export here proves every key of it maps to a layer and every patch has the layer's shape.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..models.adapters import adapter_kind
from .deltas import factor_product
from .kohya_keys import KOHYA_SUFFIXES, ExportError, kohya_key, sgm_module_names


def apply_kohya_lora(unet: nn.Module, state_dict: Mapping[str, torch.Tensor], strength: float = 1.0) -> list[str]:
    """Patch a plain diffusers UNet's Linear and conv weights in place from kohya UNet keys, as ComfyUI does.

    ``W + strength * alpha/r * up @ down`` (no alpha: scale 1), or ``W + strength * diff``
    (``diff_b`` on the bias). A module is found under its diffusers path or, as ComfyUI also maps
    (``model_lora_keys_unet``), its SGM / LDM path in a single file of the UNet's config
    (``lora_unet_input_blocks_4_1_…``). Unlike ComfyUI, any key that maps to no Linear layer, has an
    unknown suffix or an incomplete pair raises, and nothing is patched unless everything fits.
    Sums are taken in fp32 and cast back to the weight's dtype. Returns the patched module names.
    """
    if adapter_kind(unet) is not None:
        raise ExportError("apply_kohya_lora patches plain weights: give it a UNet without adapters")
    modules = {n: m for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    linears = {kohya_key(n): (n, m) for n, m in modules.items()}
    config = getattr(unet, "config", None)
    try:  # the SGM aliases of a UNet the single-file layout describes (not, e.g., per-level layers_per_block)
        aliases = sgm_module_names(modules, config) if config is not None else {}
    except ExportError:
        aliases = {}
    linears.update({kohya_key(path): (n, modules[n]) for n, path in aliases.items()})
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        stem, _, suffix = key.partition(".")
        if suffix not in KOHYA_SUFFIXES:
            raise ExportError(
                f"{key}: unknown kohya key suffix {suffix!r}; expected one of {', '.join(KOHYA_SUFFIXES)}"
            )
        if stem not in linears:
            raise ExportError(f"{key} maps to no Linear or conv layer of this UNet")
        groups.setdefault(stem, {})[suffix] = value

    updates: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, new value)
    for stem, parts in groups.items():
        name, module = linears[stem]
        has_lora = bool({"lora_up.weight", "lora_down.weight"} & set(parts))
        if has_lora and "diff" in parts:
            raise ExportError(f"{stem} has both a .diff and lora_up/lora_down: ambiguous")
        delta = None
        if "diff" in parts:
            delta = parts["diff"].float()
        elif has_lora:
            if not {"lora_up.weight", "lora_down.weight"} <= set(parts):
                raise ExportError(f"{stem} has only one of lora_up.weight / lora_down.weight")
            up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()  # (out, r), (r, in)
            scale = float(parts["alpha"]) / down.shape[0] if "alpha" in parts else 1.0
            delta = scale * factor_product(down, up)
        elif "alpha" in parts:
            raise ExportError(f"{stem} has an .alpha but no lora_up/lora_down")
        if delta is not None:
            if tuple(delta.shape) != tuple(module.weight.shape):
                raise ExportError(f"{stem}: patch shape {tuple(delta.shape)} != weight {tuple(module.weight.shape)}")
            updates.append((module.weight, module.weight.float() + strength * delta.to(module.weight.device)))
        if "diff_b" in parts:
            if module.bias is None or tuple(parts["diff_b"].shape) != tuple(module.bias.shape):
                raise ExportError(f"{stem}.diff_b does not fit the bias of {name}")
            bias_delta = parts["diff_b"].float().to(module.bias.device)
            updates.append((module.bias, module.bias.float() + strength * bias_delta))

    with torch.no_grad():
        for param, value in updates:
            if not torch.isfinite(value).all():
                raise ExportError("refusing to apply a patch that makes a weight non-finite")
        for param, value in updates:
            param.copy_(value.to(param.dtype))
    return sorted(linears[stem][0] for stem in groups)
