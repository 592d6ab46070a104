"""Trainable adapters on a frozen UNet: Custom-Diffusion K/V deltas (default) or peft LoRA.

Both wrap the frozen layers instead of replacing their weights, so the base tensors stay
bit-for-bit unchanged and the adapter's state dict is exactly what was learned:

- ``custom_diffusion``: each cross-attention ``attn2.to_k`` / ``attn2.to_v`` gets an additive
  weight delta, ``W' = W + ΔW`` (ΔW starts at zero, kept in fp32). Training ΔW is training the
  K/V weights as Custom Diffusion does; weight decay pulls ΔW toward the base weights rather
  than toward zero. ΔW is also exactly the ``.diff`` patch a LoRA export writes.
- ``lora``: peft LoRA layers on the configured module-name suffixes.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

CUSTOM_DIFFUSION_TARGETS = ("attn2.to_k", "attn2.to_v")
LORA_ADAPTER_NAME = "echodistill"


class WeightDelta(nn.Module):
    """A frozen Linear plus a trainable fp32 weight delta: y = x (W + ΔW)^T + b."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.delta = nn.Parameter(torch.zeros(base.weight.shape, dtype=torch.float32, device=base.weight.device))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Summed in fp32: a small delta would round away against bf16 weights.
        weight = (self.base.weight.float() + self.delta).to(hidden_states.dtype)
        return F.linear(hidden_states, weight, self.base.bias)

    def merged_weight(self) -> torch.Tensor:
        merged = self.base.weight.float() + self.delta.detach()
        if not torch.isfinite(merged).all():
            raise ValueError("refusing to merge a non-finite weight delta")
        return merged.to(self.base.weight.dtype)


def _modules_with_suffix(unet: nn.Module, suffixes: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in unet.named_modules() if any(n == s or n.endswith("." + s) for s in suffixes)]


def add_custom_diffusion(unet: nn.Module) -> list[nn.Parameter]:
    """Wrap every attn2.to_k / attn2.to_v of `unet` with a WeightDelta; returns the new parameters."""
    targets = [(n, m) for n, m in _modules_with_suffix(unet, CUSTOM_DIFFUSION_TARGETS) if isinstance(m, nn.Linear)]
    if not targets:
        raise ConfigError("the UNet has no cross-attention attn2.to_k/to_v layers to adapt")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name), child, WeightDelta(module))
    return adapter_parameters(unet)


def add_lora(unet: nn.Module, rank: int, alpha: float, targets: tuple[str, ...]) -> list[nn.Parameter]:
    from peft import LoraConfig, inject_adapter_in_model

    if not _modules_with_suffix(unet, targets):
        raise ConfigError(f"lora_targets={list(targets)!r} match no module of the UNet (e.g. 'attn2.to_k')",
                          parameters=("lora_targets",))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    inject_adapter_in_model(config, unet, adapter_name=LORA_ADAPTER_NAME)
    for name, param in unet.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()  # fp32 master weights whatever the base dtype
            param.requires_grad_(True)
    return adapter_parameters(unet)


def add_adapter(unet: nn.Module, config) -> list[nn.Parameter]:
    """The adapter a training config asks for (its `adapter`, `lora_rank`, `lora_alpha`, `lora_targets`)."""
    if config.adapter == "custom_diffusion":
        return add_custom_diffusion(unet)
    return add_lora(unet, config.lora_rank, config.lora_alpha, config.lora_targets)


def adapter_kind(unet: nn.Module) -> str | None:
    if any(isinstance(m, WeightDelta) for m in unet.modules()):
        return "custom_diffusion"
    if any("lora_" in n for n, _ in unet.named_parameters()):
        return "lora"
    return None


def _is_adapter_parameter(name: str) -> bool:
    return name.endswith(".delta") or "lora_" in name


def adapter_parameters(unet: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in unet.named_parameters() if _is_adapter_parameter(n)]


def adapter_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if _is_adapter_parameter(n)}


def load_adapter_state_dict(unet: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    own = dict((n, p) for n, p in unet.named_parameters() if _is_adapter_parameter(n))
    if set(own) != set(state):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ConfigError(
            f"adapter weights do not fit this UNet (missing {missing[:2]}, unexpected {extra[:2]}): "
            "was it trained with another adapter kind or LoRA rank/targets?"
        )
    with torch.no_grad():
        for name, value in state.items():
            if own[name].shape != value.shape:
                raise ConfigError(
                    f"adapter tensor {name} has shape {tuple(value.shape)}, expected {tuple(own[name].shape)}"
                )
            own[name].copy_(value.to(own[name]))


def kv_deltas(unet: nn.Module) -> dict[str, torch.Tensor]:
    """module name -> ΔW (fp32) of every adapted linear layer, for either adapter kind."""
    deltas = {}
    for name, module in unet.named_modules():
        if isinstance(module, WeightDelta):
            deltas[name] = module.delta.detach().float()
        elif hasattr(module, "lora_A") and LORA_ADAPTER_NAME in getattr(module, "lora_A", {}):
            down = module.lora_A[LORA_ADAPTER_NAME].weight.detach().float()  # (r, in)
            up = module.lora_B[LORA_ADAPTER_NAME].weight.detach().float()  # (out, r)
            deltas[name] = module.scaling[LORA_ADAPTER_NAME] * (up @ down)
    return deltas


def remove_adapters(unet: nn.Module) -> None:
    """Unwrap every adapter, leaving the original frozen layers in place (base weights untouched)."""
    for name, module in list(unet.named_modules()):
        base = module.base if isinstance(module, WeightDelta) else None
        if base is None and hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            base = module.base_layer
        if base is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent_name) if parent_name else unet, child, base)
    if hasattr(unet, "peft_config"):
        del unet.peft_config
