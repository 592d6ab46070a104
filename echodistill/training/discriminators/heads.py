"""The small trainable classifier that sits on top of every frozen feature extractor."""

from __future__ import annotations

import torch
import torch.nn as nn


class DiscriminatorHead(nn.Module):
    """Features (B, feature_dim) -> real/fake logits (B, 2): Linear -> ReLU -> Linear.

    Column 1 is "real" and column 0 "fake", as in ``echodistill.training.losses.adversarial``. The
    constructor arguments are kept as attributes so a saved head can be rebuilt.
    """

    def __init__(self, feature_dim: int, hidden_dim: int = 512):
        super().__init__()
        self.feature_dim = feature_dim
        self.hidden_dim = hidden_dim
        self.net = nn.Sequential(
            nn.Linear(feature_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, 2),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.to(self.net[0].weight.dtype))  # (B, 2)
