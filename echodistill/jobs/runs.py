"""Training a concept as a whole job on a loaded pair, for front ends that keep the pair loaded.

Each job borrows the pair through `pristine`, so the pair is unchanged afterwards and the next
job (another concept, another training) starts from the same base models.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ..concepts.bundle import ConceptBundle
from ..concepts.export import load_checked_bundle
from ..errors import EchoDistillError, OutputWriteError
from ..files import check_writable, exclusive_output
from ..models.pair import ModelPair
from ..models.pristine import pristine
from ..sampling.with_concept import sample
from ..training.callbacks import Callbacks
from ..training.checkpointing import CHECKPOINT_NAME, TrainingCheckpoint
from ..training.config import FIELDS_ADDED_LATER, TrainConfig
from ..training.data import load_concept_images
from ..training.photos import check_photo_count
from ..training.trainer import Trainer

BUNDLE_NAME = "concept.safetensors"


@dataclass
class TrainingResult:
    bundle: ConceptBundle
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    preview: torch.Tensor | None = None  # (N, 3, H, W) in [0, 1], the last one
    resumed_from: int = 0
    reused: bool = False  # the run had finished before: its bundle was loaded, nothing trained


class _Recorder(Callbacks):
    """Passes everything through to the caller's callbacks and keeps the loss history."""

    def __init__(self, inner: Callbacks):
        self.inner, self.history, self.preview = inner, [], None

    def on_progress(self, step, total, logs):
        self.history.append((step, dict(logs)))
        self.inner.on_progress(step, total, logs)

    def on_preview(self, step, images):
        self.preview = images
        self.inner.on_preview(step, images)

    def should_stop(self):
        return self.inner.should_stop()


def run_key(pair: ModelPair, images: Sequence[Image.Image], config: TrainConfig, extras: dict | None = None) -> str:
    """A short name for a run: the same base models, photos and config give the same key."""
    digest = hashlib.sha256()
    digest.update(json.dumps(pair.fingerprints(), sort_keys=True).encode())
    # How a run is watched, not what it computes; and its length where a longer run continues a shorter one
    # step for step (a sequential schedule switches phase at steps // 2, so there it names another run).
    exclude = {"sample_every", "save_every", "log_every"} | ({"steps"} if config.schedule != "sequential" else set())
    fields = {k: v for k, v in config.to_dict().items() if k not in exclude}
    for name, before in FIELDS_ADDED_LATER.items():  # at the value that trains as before the field: the key of old
        if fields.get(name) == before:  # runs, so that their finished results and checkpoints are still found
            fields.pop(name)
    if not config.echo:  # a schedule that never runs computes nothing
        fields.pop("echo_start"), fields.pop("echo_every")
    elif "steps" in exclude:  # the echo schedule a preset scales to the length: its fraction of the run names it
        fields.update(echo_start=config.echo_start / config.steps, echo_every=config.echo_every / config.steps)
    digest.update(json.dumps(fields, sort_keys=True).encode())
    digest.update(json.dumps(extras or {}, sort_keys=True, default=str).encode())
    for image in images:
        digest.update(image.convert("RGB").tobytes())
    return digest.hexdigest()[:16]


def train_concept(
    pair: ModelPair,
    images: Sequence[Image.Image] | str | os.PathLike,
    config: TrainConfig,
    *,
    run_dir: str | os.PathLike,
    callbacks: Callbacks | None = None,
    resume: bool = True,
    reuse_finished: bool = True,
    backbone_paths: dict[str, str | os.PathLike] | None = None,
    ip_adapter_path: str | os.PathLike | None = None,
    captions: Sequence[str | None] | None = None,
) -> TrainingResult:
    """Train (or resume, or reuse) a concept in `run_dir`; the pair is left as it was.

    `captions`, one per photo ("{}" for "<token> <class word>"; None: the prompt templates), override
    the photos' sidecar captions (see `load_concept_images`); `run_key` should be given them too.

    `run_dir` names one run (see `run_key`): when it holds the finished bundle, that is reused
    (`reuse_finished`); when it holds a checkpoint of a stopped run, training resumes from it
    (`resume`). Cancellation raises TrainingCancelled after the checkpoint is written. A finished bundle that is
    damaged, or does not fit the UNet configs it stores, is refused (EchoDistillError naming it and the run folder).
    """
    run_dir = Path(run_dir)
    check_writable(run_dir, "run folder")  # before any photo is read or step is taken
    with exclusive_output(run_dir, "run folder"):
        return _train_in(run_dir, pair, images, config, callbacks=callbacks, resume=resume,
                         reuse_finished=reuse_finished, backbone_paths=backbone_paths,
                         ip_adapter_path=ip_adapter_path, captions=captions)


def _train_in(run_dir: Path, pair: ModelPair, images, config: TrainConfig, *, callbacks, resume, reuse_finished,
              backbone_paths, ip_adapter_path, captions) -> TrainingResult:
    finished = run_dir / BUNDLE_NAME
    if reuse_finished and finished.is_file():
        try:  # a file from an earlier process, maybe edited since: checked before a sampler reads it
            bundle = load_checked_bundle(finished)
        except EchoDistillError as exc:
            raise type(exc)(f"{exc} (the finished run in {run_dir}: delete {finished.name} there to train it "
                            "again)") from None
        base = pair.fingerprints()
        if bundle.step == config.steps and {k: bundle.fingerprints.get(k) for k in base} == base:
            prompt = f"a photo of a {bundle.token} {bundle.class_word}"
            preview = sample(pair, [prompt] * 2, concept=bundle, seeds=[0, 1], width=config.resolution,
                             height=config.resolution, return_latents=False).images
            return TrainingResult(bundle, preview=preview, reused=True)
    concept_images = load_concept_images(images, captions=captions, resolution=config.resolution)
    check_photo_count(concept_images, str(images) if isinstance(images, (str, os.PathLike)) else "the photos given")
    recorder = _Recorder(callbacks or Callbacks())
    with torch.inference_mode(False), torch.enable_grad(), pristine(pair):
        trainer = Trainer(pair, concept_images, config, backbone_paths=backbone_paths,
                          ip_adapter_path=ip_adapter_path, run_dir=run_dir, callbacks=recorder)
        checkpoint = run_dir / CHECKPOINT_NAME
        resumed_from = 0
        if resume and checkpoint.is_file():
            saved = TrainingCheckpoint.load(checkpoint).step
            if saved > config.steps:
                raise EchoDistillError(
                    f"{run_dir} holds this run at step {saved}, beyond steps={config.steps}: ask for "
                    f"{saved} steps or more to continue it, or turn resume off to train it again from step 0 "
                    "(which replaces it)"
                )
            trainer.resume(checkpoint)
            resumed_from = trainer.step
        bundle = trainer.train()
        if recorder.preview is None:
            recorder.preview = trainer.preview()
    try:
        bundle.save(finished)
    except OutputWriteError as exc:
        raise OutputWriteError(
            f"{exc}; the trained state is kept in {checkpoint} (step {bundle.step}): free space or fix the folder "
            "and run the same training again, it continues from there"
        ) from exc
    return TrainingResult(bundle, recorder.history, recorder.preview, resumed_from)
