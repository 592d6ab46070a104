"""Oracle metrics of the mini world: did the picture follow the prompt, and is it the subject?

* Prompt fidelity: a small CNN (`AttributeReader`) reads every attribute of the grammar back
  from a picture (object shape, colour, size, position; background colour, pattern). The score
  of an image is the fraction of the attributes its prompt states that are read back as stated.
  It is the mini world's CLIP-T, with the difference that it is exact: the world's captions
  are structured, so there is no guessing what a prompt asked for.
* Subject fidelity: a small CNN (`SubjectEncoder`) embeds a picture's subject invariantly to
  where it stands and on what; the score is the mean over all (generated, reference) pairs of
  max(0, cosine), as DINO and CLIP-I are reported (metrics.mean_clipped_cosine). It was trained
  contrastively to tell apart the grammar's coloured shapes and thousands of procedural subjects
  (procedural.py), never the subjects it scores — as DINO never saw DreamBench's dog.

Both were trained on renders in random contexts, with blur, noise and colour jitter so that
generated pictures are read, not only clean ones. Each weight file describes itself: its
safetensors metadata holds the constructor arguments and the labels it was trained on.

    oracle = Oracle.load()
    oracle.prompt_fidelity(images, [caption.stated for caption in captions])   # (N,) in [0, 1]
    oracle.subject_fidelity(generated, references)                            # float in [0, 1]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import EchoDistillError
from ..evaluation.metrics import mean_clipped_cosine
from ..models.tensor_files import atomic_save_safetensors, open_safetensors
from .architecture import ORACLE_ROOT
from .grammar import ATTRIBUTES, COLORS, SHAPES
from .procedural import ORACLE_SEEDS

READER_FILE = "attribute_reader.safetensors"
ENCODER_FILE = "subject_encoder.safetensors"
IMAGE_SIZE = 64

# What the encoder learned to tell apart (stored in its file): the grammar's coloured shapes and
# the procedural subjects of the oracle's seed range. The named concepts are not among them.
GRAMMAR_SUBJECTS: tuple[str, ...] = tuple(f"{color} {shape}" for shape in SHAPES for color in COLORS)
TRAINING_SUBJECTS: dict[str, object] = {
    "grammar": list(GRAMMAR_SUBJECTS),
    "procedural_seeds": [ORACLE_SEEDS.start, ORACLE_SEEDS.stop],
}


class OracleError(EchoDistillError):
    """An oracle's weights are missing or do not fit, or its inputs are unusable."""


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class AttributeReader(nn.Module):
    """64×64 picture -> one logit vector per grammar attribute.

    Flattens its last 4×4 feature map instead of pooling it: position is an attribute, and a
    pooled feature would have to smuggle it through.
    """

    def __init__(self, width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.config = {"width": width, "hidden": hidden}
        self.features = nn.Sequential(
            _conv(3, width, 2), _conv(width, 2 * width, 2), _conv(2 * width, 2 * width, 2), _conv(2 * width, 2 * width, 2)
        )  # (B, 2w, 4, 4)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, hidden), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(choices)) for name, choices in ATTRIBUTES.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixels (B, 3, 64, 64) in [-1, 1] -> {attribute: logits (B, choices)}."""
        hidden = self.body(self.features(pixels))  # (B, hidden)
        return {name: head(hidden) for name, head in self.heads.items()}


class SubjectEncoder(nn.Module):
    """64×64 picture -> unit-length subject embedding, pooled so that place and size drop out.

    Trained contrastively (oracle_train.train_subject_encoder): two pictures of one subject in
    different scenes are pulled together, pictures of different subjects pushed apart, so the
    cosine between embeddings is what the subject-fidelity metric reports.
    """

    def __init__(self, width: int = 48, dim: int = 128) -> None:
        super().__init__()
        self.config = {"width": width, "dim": dim}
        self.features = nn.Sequential(
            _conv(3, width, 2), _conv(width, 2 * width, 2), _conv(2 * width, 2 * width, 1),
            _conv(2 * width, 3 * width, 2), _conv(3 * width, 3 * width, 1),
        )  # (B, 3w, 8, 8); no full-resolution layer: it would cost 4× the rest for little
        self.project = nn.Linear(6 * width, dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, 64, 64) in [-1, 1] -> embeddings (B, dim), L2-normalized."""
        features = self.features(pixels)  # (B, 3w, 8, 8)
        # max pooling keeps a small object's evidence; mean pooling the broad one of a large object
        pooled = torch.cat([features.amax(dim=(2, 3)), features.mean(dim=(2, 3))], dim=1)  # (B, 6w)
        return F.normalize(self.project(pooled), dim=1)


# Encoders trained with a cosine classifier carried class prototypes and their size in the file;
# scoring never used them, so such files still load as plain encoders.
_LEGACY_ENCODER = {"config": ("subjects", "scale"), "state": ("prototypes",)}


def save_module(module: nn.Module, path: Path, labels: Mapping | Sequence) -> None:
    """fp16 weights + constructor arguments + labels in one file, written atomically."""
    state = {k: v.detach().half().contiguous() for k, v in module.state_dict().items()}
    metadata = {"class": type(module).__name__, "config": json.dumps(module.config), "labels": json.dumps(labels)}
    atomic_save_safetensors(state, path, metadata)  # with the mode a plain open() gives


def load_module(path: Path, cls: type[nn.Module], labels: Mapping | Sequence | None) -> nn.Module:
    """The module saved at `path`; `labels` None accepts the labels it was saved with (the subject encoder's)."""
    if not path.is_file():
        raise OracleError(f"oracle weights not found: {path}; run scripts/train_miniworld.py to build them")
    with open_safetensors(path, OracleError, "rebuild it with scripts/train_miniworld.py") as handle:
        metadata = handle.metadata() or {}
    try:
        saved_labels = json.loads(metadata.get("labels", "null"))
    except ValueError as error:  # an edited header
        raise OracleError(f"{path} is not a readable oracle file (its labels: {error}); rebuild it with "
                          "scripts/train_miniworld.py") from None
    if metadata.get("class") != cls.__name__ or (labels is not None and saved_labels != json.loads(json.dumps(labels))):
        raise OracleError(
            f"{path.name} was trained for other labels or another class ({metadata.get('class')}); "
            "the grammar or the concepts changed since: retrain with scripts/train_miniworld.py"
        )
    try:
        config, state = json.loads(metadata["config"]), load_file(str(path))
        if cls is SubjectEncoder:
            config = {k: v for k, v in config.items() if k not in _LEGACY_ENCODER["config"]}
            state = {k: v for k, v in state.items() if k not in _LEGACY_ENCODER["state"]}
        module = cls(**config)
        module.load_state_dict({k: v.float() for k, v in state.items()})
    except (KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as error:  # weights that do not fit
        raise OracleError(f"{path} does not hold {cls.__name__} weights this version can read ({error}); rebuild it with "
                          "scripts/train_miniworld.py") from None
    return module.eval().requires_grad_(False)


def as_signed_pixels(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1] (what the samplers return) or (N, H, W, 3) uint8 -> (N, 3, 64, 64) in [-1, 1]."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise OracleError(f"numpy images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    if images.ndim != 4 or images.shape[1] != 3:
        raise OracleError(f"images must be (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    images = images.float().cpu()
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True,
                               align_corners=False)
    return images.clamp(0, 1) * 2 - 1


@dataclass
class Oracle:
    reader: AttributeReader
    encoder: SubjectEncoder

    @classmethod
    def load(cls, folder: str | os.PathLike = ORACLE_ROOT) -> "Oracle":
        folder = Path(folder)
        return cls(
            load_module(folder / READER_FILE, AttributeReader, ATTRIBUTES),
            # Any subjects: the encoder scores subjects by cosine, not by its training classes.
            load_module(folder / ENCODER_FILE, SubjectEncoder, None),
        )

    def save(self, folder: str | os.PathLike = ORACLE_ROOT) -> None:
        save_module(self.reader, Path(folder) / READER_FILE, ATTRIBUTES)
        save_module(self.encoder, Path(folder) / ENCODER_FILE, TRAINING_SUBJECTS)

    @torch.no_grad()
    def read(self, images: torch.Tensor | np.ndarray) -> list[dict[str, str]]:
        """The attributes read from each picture: [{attribute: word}]."""
        logits = self.reader(as_signed_pixels(images))
        indices = {name: values.argmax(dim=1).tolist() for name, values in logits.items()}
        return [{name: ATTRIBUTES[name][indices[name][i]] for name in ATTRIBUTES} for i in range(len(images))]

    def prompt_fidelity(self, images: torch.Tensor | np.ndarray, stated: Sequence[Mapping[str, str]]) -> torch.Tensor:
        """(N,) fraction of each prompt's stated attributes read back from its picture."""
        if len(stated) != len(images):
            raise OracleError(f"got {len(stated)} attribute sets for {len(images)} images: give one per image")
        unknown = {name for s in stated for name in s} - set(ATTRIBUTES)
        if unknown:
            raise OracleError(f"unknown attributes {sorted(unknown)}; the oracle reads {sorted(ATTRIBUTES)}")
        scores = []
        for read, asked in zip(self.read(images), stated):
            scores.append(sum(read[name] == value for name, value in asked.items()) / max(1, len(asked)))
        return torch.tensor(scores)

    @torch.no_grad()
    def subject_embeddings(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.encoder(as_signed_pixels(images))  # (N, D), unit length

    def subject_fidelity(self, generated: torch.Tensor | np.ndarray, references: torch.Tensor | np.ndarray) -> float:
        """Mean over all (generated, reference) pairs of max(0, cos) of subject embeddings."""
        return mean_clipped_cosine(self.subject_embeddings(generated), self.subject_embeddings(references))
