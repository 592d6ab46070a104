"""Idle models wait on the CPU: each training stage names the modules it uses, the rest move off.

    offloader = Offloader({"text_encoder": te, "vae": vae}, device=cuda, enabled=True)
    offloader.use("text_encoder")   # te on cuda, vae on the CPU
    offloader.use("vae")            # te back to the CPU, vae on cuda

What it buys: an image backbone (CLIP ViT-H: 1.3 GB in bf16) leaves the GPU for the teacher
step, the text encoder (0.7 GB) for the student step, when the activations peak. What it costs:
each move is a copy over PCIe (~25 GB/s), paid every iteration. UNets are never moved: they
are needed in almost every stage and are the largest copies. On the CPU it does nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


class Offloader:
    def __init__(self, modules: dict[str, nn.Module], device: torch.device | str, *, enabled: bool,
                 idle_device: torch.device | str = "cpu"):
        self.modules = modules
        self.device, self.idle_device = torch.device(device), torch.device(idle_device)
        self.enabled = enabled and self.device != self.idle_device
        self.in_use: frozenset[str] = frozenset(modules)  # what the current stage asked for
        self.placed = {name: next(module.parameters()).device for name, module in modules.items()}

    def use(self, *names: str) -> None:
        """Put the named modules on the device and every other managed module on the idle device."""
        unknown = sorted(set(names) - set(self.modules))
        if unknown:
            raise ConfigError(f"offload: unknown module(s) {unknown}; managed: {', '.join(self.modules)}")
        wanted = frozenset(names)
        if self.enabled:
            for name, module in self.modules.items():
                target = self.device if name in wanted else self.idle_device
                if self.placed[name] != target:  # already there: no copy
                    module.to(target)
                    self.placed[name] = target
        self.in_use = wanted

    def use_all(self) -> None:
        self.use(*self.modules)
