"""How a front end observes and steers training: callbacks, and the two ways a run stops early.

The trainer calls `on_progress` and `on_preview` between whole steps and asks `should_stop`
before each one; only the front ends wire these to a progress bar or an interrupt check.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import EchoDistillError


class TrainingCancelled(EchoDistillError):
    """Training stopped on request; `checkpoint` resumes it."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"training cancelled at step {step}; resume from {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class TrainingDiverged(EchoDistillError):
    """A loss became NaN/inf; the last good checkpoint on disk is kept."""


class Callbacks:
    """How a UI observes and steers training. Override what you need."""

    def on_progress(self, step: int, total: int, logs: dict[str, float]) -> None: ...

    def on_preview(self, step: int, images: torch.Tensor) -> None: ...  # (N, 3, H, W) in [0, 1]

    def on_train_end(self, step: int) -> None: ...  # the last step done and its checkpoint written (if any)

    def should_stop(self) -> bool:
        return False
