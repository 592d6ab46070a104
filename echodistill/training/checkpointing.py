"""Resumable training checkpoints: trainable weights, optimizer states, step, RNG, config.

What a `Trainer` saves (`TrainingCheckpoint.capture`) and how it is put back (`restore`): a run
resumed from a checkpoint continues exactly as the uninterrupted run would have. Written
atomically (temp file + rename), read back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses

import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import EchoDistillError
from ..files import atomic_write_bytes
from ..models.adapters import adapter_state_dict, load_adapter_state_dict
from ..models.concept import concept_rows
from .config import TrainConfig

CHECKPOINT_NAME = "checkpoint.pt"  # in a run's folder

# Fields a resumed run may change without changing what it computes step by step.
RESUMABLE_CHANGES = frozenset({"steps", "sample_every", "save_every", "log_every"})
# The echo schedule a preset scales to the run's length (echo at steps/2, then every steps/4): a longer
# run may move it along with `steps`; the steps already trained keep the rounds they had.
SCALED_WITH_STEPS = frozenset({"echo_start", "echo_every"})


def _row_name(stem: str, index: int) -> str:
    """Checkpoint entry of the token row of text encoder `index`: "concept_row", "concept_row_2", ..."""
    return stem if index == 0 else f"{stem}_{index + 1}"


def _rows(stem: str, rows) -> dict[str, dict[str, torch.Tensor]]:
    return {_row_name(stem, i): {"row": row.detach().clone()} for i, row in enumerate(rows)}


@dataclass
class TrainingCheckpoint:
    step: int
    config: dict
    weights: dict[str, dict[str, torch.Tensor]]
    optimizers: dict[str, dict]
    rng: dict[str, torch.Tensor]
    echo: dict
    fingerprints: dict[str, str]
    data: str = ""  # hash of the photos and captions trained on ("" in checkpoints of older versions)

    @classmethod
    def capture(cls, trainer) -> "TrainingCheckpoint":
        """Everything a `Trainer` needs to continue where it is: trainable weights, optimizers, RNG, echo buffer."""
        pair = trainer.pair
        return cls(
            step=trainer.step,
            config=trainer.config.to_dict(),
            weights={
                "teacher_adapter": adapter_state_dict(pair.teacher.unet),
                "student_adapter": adapter_state_dict(pair.student.unet),
                # "concept_row" is the first text encoder's row; SDXL adds "concept_row_2" (the bigG encoder's).
                **_rows("concept_row", concept_rows(pair.text_encoders)),
                "heads": trainer.ensemble.heads_state_dict(),
                **({} if trainer.student_rows is None else
                   _rows("student_row", [r.concept_row for r in trainer.student_rows])),
            },
            optimizers={
                "teacher": trainer.teacher_optimizer.state_dict(),
                "student": trainer.student_optimizer.state_dict(),
                "heads": trainer.heads_optimizer.state_dict(),
                "scalers": [scaler.state_dict() for scaler in trainer.scalers.values()],
            },
            rng={"data": trainer.data_generator.get_state(), "noise": trainer.noise_generator.get_state()},
            echo=trainer.echo.state_dict(),
            fingerprints=pair.fingerprints(),
            data=trainer.data_identity,
        )

    def restore(self, trainer) -> None:
        """Put this state into a `Trainer` built with the same config on the same base models."""
        pair = trainer.pair
        self.check_compatible(trainer.config, pair.fingerprints(), trainer.data_identity)
        load_adapter_state_dict(pair.teacher.unet, self.weights["teacher_adapter"])
        load_adapter_state_dict(pair.student.unet, self.weights["student_adapter"])
        with torch.no_grad():
            for index, row in enumerate(concept_rows(pair.text_encoders)):
                row.copy_(self.weights[_row_name("concept_row", index)]["row"])
            for index, row in enumerate(() if trainer.student_rows is None else trainer.student_rows):
                row.concept_row.copy_(self.weights[_row_name("student_row", index)]["row"])
        trainer.ensemble.load_heads_state_dict(self.weights["heads"])
        trainer.teacher_optimizer.load_state_dict(self.optimizers["teacher"])
        trainer.student_optimizer.load_state_dict(self.optimizers["student"])
        trainer.heads_optimizer.load_state_dict(self.optimizers["heads"])
        for scaler, saved in zip(trainer.scalers.values(), self.optimizers["scalers"]):
            scaler.load_state_dict(saved)
        trainer.data_generator.set_state(self.rng["data"])
        trainer.noise_generator.set_state(self.rng["noise"])
        trainer.echo.load_state_dict(self.echo)
        trainer.step = self.step

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic; serialized in memory first so a full disk is named as such (OutputWriteError)."""
        buffer = io.BytesIO()
        torch.save(asdict(self), buffer)
        return atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainingCheckpoint":
        path = Path(path)
        if not path.is_file():
            raise EchoDistillError(f"checkpoint not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise EchoDistillError(f"{path.name} is not a readable EchoDistill checkpoint: {exc}") from exc
        expected = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(state, dict) or not set(state) <= expected or "step" not in state:
            raise EchoDistillError(
                f"{path} is not a training checkpoint (a concept bundle or another file?): resume from the "
                f"{CHECKPOINT_NAME} in the run's folder"
            )
        return cls(**state)

    def check_compatible(self, config: TrainConfig, fingerprints: dict[str, str], data: str = "") -> None:
        saved = TrainConfig.from_dict(self.config).to_dict()
        # A sequential run switches phase at steps // 2: changing steps would move that switch.
        resumable = RESUMABLE_CHANGES - ({"steps"} if config.schedule == "sequential" else set())
        if "steps" in resumable and saved["steps"] != config.steps:
            resumable |= SCALED_WITH_STEPS
        changed = sorted(k for k, v in config.to_dict().items() if saved[k] != v and k not in resumable)
        if changed:
            raise EchoDistillError(
                f"cannot resume: the config differs from the checkpoint's in {', '.join(changed)}; "
                f"only {', '.join(sorted(resumable))} may change on resume"
            )
        if "scheme" in fingerprints and "scheme" not in self.fingerprints:
            raise EchoDistillError(
                "cannot resume: the checkpoint was written by an older version whose base-model fingerprints cannot "
                "be compared with this one's; start the run again (a new run folder or --out)"
            )
        if fingerprints != self.fingerprints:
            raise EchoDistillError(
                f"cannot resume: the checkpoint was trained on other base models ({self.fingerprints}) "
                f"than the loaded ones ({fingerprints})"
            )
        if self.data and data and data != self.data:
            raise EchoDistillError(
                "cannot resume: the checkpoint was trained on other photos or captions than the ones given; "
                "resume with the same photos and captions, or start a new run (another output or run folder)"
            )
        if self.step > config.steps:
            raise EchoDistillError(f"the checkpoint is at step {self.step}, beyond steps={config.steps}")


def checkpoint_path(run_dir: Path | None) -> Path:
    """Where a run keeps its checkpoint."""
    if run_dir is None:
        raise EchoDistillError("no run_dir was given, so there is nowhere to save a checkpoint")
    return run_dir / CHECKPOINT_NAME


def data_identity(images) -> str:
    """A short hash of the photos (pixels, in order) and their captions: what a resumed run must train on again."""
    import hashlib
    import json

    digest = hashlib.sha256()
    for item in images:
        picture = item.image.convert("RGB")
        digest.update(json.dumps([picture.size, item.caption]).encode())
        digest.update(picture.tobytes())
    return digest.hexdigest()[:16]
