"""Resumable training checkpoints: trainable weights, optimizer states, step, RNG, config.

Written atomically (temp file + rename), read back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import EchoDistillError
from .config import TrainConfig

# Fields a resumed run may change without changing what it computes step by step.
RESUMABLE_CHANGES = frozenset({"steps", "sample_every", "save_every", "log_every"})


@dataclass
class TrainingCheckpoint:
    step: int
    config: dict
    weights: dict[str, dict[str, torch.Tensor]]
    optimizers: dict[str, dict]
    rng: dict[str, torch.Tensor]
    echo: dict
    fingerprints: dict[str, str]

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.save(asdict(self), tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainingCheckpoint":
        path = Path(path)
        if not path.is_file():
            raise EchoDistillError(f"checkpoint not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise EchoDistillError(f"{path.name} is not a readable EchoDistill checkpoint: {exc}") from exc
        return cls(**state)

    def check_compatible(self, config: TrainConfig, fingerprints: dict[str, str]) -> None:
        saved = TrainConfig.from_dict(self.config).to_dict()
        # A sequential run switches phase at steps // 2: changing steps would move that switch.
        resumable = RESUMABLE_CHANGES - ({"steps"} if config.schedule == "sequential" else set())
        changed = sorted(k for k, v in config.to_dict().items() if saved[k] != v and k not in resumable)
        if changed:
            raise EchoDistillError(
                f"cannot resume: the config differs from the checkpoint's in {', '.join(changed)}; "
                f"only {', '.join(sorted(resumable))} may change on resume"
            )
        if fingerprints != self.fingerprints:
            raise EchoDistillError(
                f"cannot resume: the checkpoint was trained on other base models ({self.fingerprints}) "
                f"than the loaded ones ({fingerprints})"
            )
        if self.step > config.steps:
            raise EchoDistillError(f"the checkpoint is at step {self.step}, beyond steps={config.steps}")
