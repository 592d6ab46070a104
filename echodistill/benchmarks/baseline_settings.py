"""The student-only baselines' settings: what each trains and at which published rate, free of torch.

baselines.py trains them; `bench quality --help` and the methods table read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..training.config import TrainConfig

DREAMBOOTH_IDENTIFIER = "sks"  # DreamBooth's rare token: a word the text encoder has (almost) no meaning for
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")  # self- and cross-attention alike


@dataclass(frozen=True)
class Baseline:
    """What a baseline trains, and the config fields it trains with (its published learning rate)."""

    summary: str
    trains_unet: bool
    trains_token: bool
    settings: dict[str, Any] = field(default_factory=dict)


BASELINES: dict[str, Baseline] = {
    "custom_diffusion": Baseline(
        "student cross-attention K/V + token row", True, True, {"adapter": "custom_diffusion", "lr_student": 1e-5}
    ),
    "textual_inversion": Baseline("token row only", False, True, {"lr_student": 5e-3}),
    "dreambooth_lora": Baseline(
        f"LoRA rank 4 on the student's attention projections, frozen rare-token ({DREAMBOOTH_IDENTIFIER!r}) identifier",
        True,
        False,
        {"adapter": "lora", "lora_rank": 4, "lora_alpha": 4.0, "lora_targets": ATTENTION_PROJECTIONS,
         "initializer": DREAMBOOTH_IDENTIFIER, "lr_student": 1e-4},
    ),
}


def get_baseline(name: str) -> Baseline:
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; valid baselines: {', '.join(BASELINES)}")
    return BASELINES[name]


def baseline_config(name: str, **overrides) -> TrainConfig:
    """The config a baseline trains with: its settings, then `overrides` (steps, seed, class word, ...).

    Only the shared fields are read (schedule, batch, optimizer, adapter, precision); the student's
    learning rate field holds the baseline's rate. Echo is off: there is no teacher to echo to.
    """
    return TrainConfig(echo=False, sample_every=0, save_every=0).with_changes(
        **{**get_baseline(name).settings, **overrides}
    )
