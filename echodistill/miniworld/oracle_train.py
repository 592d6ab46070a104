"""Training the oracles on renders of the world and of procedural subjects, in random contexts.

The subject encoder is validated on subjects it never saw (`generalization_report`): the six
named concepts and fresh procedural seeds, each rendered in its evaluation contexts and compared
with its references (as a personalized model's pictures are) and with every other subject's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .concepts import CONCEPTS, evaluation_prompts, reference_images
from .data import RenderedSet
from .grammar import ATTRIBUTES
from .oracle import SUBJECTS, AttributeReader, Oracle, SubjectEncoder
from .procedural import VALIDATION_SEEDS, is_procedural, lookup_subject, procedural_subject
from .render import render
from .training import Log, Meter, make_optimizer, restore_loop_state, save_loop_state

IGNORE = -100  # cross_entropy's ignore_index: a concept has no grammar shape or colour


@dataclass(frozen=True)
class OracleSettings:
    images: int = 12000
    steps: int = 1500
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 50
    margin: float = 0.25  # CosFace margin (Wang et al., 2018): tighter subjects, wider gaps between them
    checkpoint_every: int = 200


def attribute_labels(rendered: RenderedSet) -> dict[str, torch.Tensor]:
    """{attribute: (N,) class index, IGNORE where the scene has no such attribute}."""
    labels = {name: [] for name in ATTRIBUTES}
    for scene in rendered.scenes:
        values = scene.attributes()
        if is_procedural(scene.subject):  # its outline is a grammar shape; its colours are its own
            values["shape"] = lookup_subject(scene.subject).class_word
        for name, choices in ATTRIBUTES.items():
            labels[name].append(choices.index(values[name]) if name in values else IGNORE)
    return {name: torch.tensor(values) for name, values in labels.items()}


def subject_labels(rendered: RenderedSet) -> torch.Tensor:
    index = {name: i for i, name in enumerate(SUBJECTS)}
    names = [scene.subject if scene.is_concept else f"{scene.color} {scene.subject}" for scene in rendered.scenes]
    return torch.tensor([index[name] for name in names])


def degrade(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What a generator does to a clean render: blur, noise, small colour shifts. (B, 3, H, W) in [-1, 1]."""
    batch = pixels.shape[0]
    u = torch.rand(batch, 4, generator=generator)
    blurred = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    amount = (u[:, 0] < 0.5).float().view(-1, 1, 1, 1) * u[:, 1].view(-1, 1, 1, 1)  # half the time, a partial blur
    pixels = pixels + amount * (blurred - pixels)
    gain = 1 + 0.06 * (torch.rand(batch, 3, 1, 1, generator=generator) * 2 - 1)
    offset = 0.06 * (torch.rand(batch, 3, 1, 1, generator=generator) * 2 - 1)
    noise = 0.08 * u[:, 2].view(-1, 1, 1, 1) * torch.randn(pixels.shape, generator=generator)
    return (pixels * gain + offset + noise).clamp(-1, 1)


def train_oracles(train: RenderedSet, valid: RenderedSet, settings: OracleSettings, seed: int, log: Log,
                  resume_path: Path | None = None) -> Oracle:
    """Both oracles in one loop over the same batches (each with its own loss and parameters).

    With `resume_path`, the whole loop state (both modules, optimizer, schedule, generator) is saved
    there every `settings.checkpoint_every` steps and picked up when it exists, as the teacher stage does.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 3)
    reader, encoder = AttributeReader().train(), SubjectEncoder().train()
    optimizer, scheduler = make_optimizer(
        [{"params": list(reader.parameters()) + list(encoder.parameters()), "lr": settings.lr, "weight_decay": 1e-4}],
        settings.steps, settings.warmup,
    )
    pixels = torch.from_numpy(train.images).permute(0, 3, 1, 2)  # (N, 3, 64, 64) uint8
    attributes, subjects = attribute_labels(train), subject_labels(train)
    modules = {"reader": reader, "encoder": encoder}
    first = restore_loop_state(resume_path, modules, optimizer, scheduler, generator, log, "oracle", settings.steps)
    meter = Meter()
    for step in range(first, settings.steps + 1):
        index = torch.randint(0, len(pixels), (settings.batch,), generator=generator)
        batch = degrade(pixels[index].float() / 127.5 - 1, generator)
        logits = reader(batch)
        reader_loss = sum(F.cross_entropy(logits[n], attributes[n][index], ignore_index=IGNORE) for n in ATTRIBUTES)
        # A flip changes no subject, so the encoder also sees mirror images.
        flipped = torch.where((torch.rand(settings.batch, generator=generator) < 0.5).view(-1, 1, 1, 1),
                              batch.flip(-1), batch)
        logits = encoder.logits(encoder(flipped))  # (B, subjects), scale · cosine
        target = F.one_hot(subjects[index], logits.shape[1]).float()
        encoder_loss = F.cross_entropy(logits - encoder.scale * settings.margin * target, subjects[index])
        loss = reader_loss + encoder_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        meter.add(reader=reader_loss.item(), encoder=encoder_loss.item())
        if step % 100 == 0 or step == settings.steps:
            log(f"oracle {meter.line(step, settings.steps)}")
        if resume_path is not None and step % settings.checkpoint_every == 0 and step < settings.steps:
            save_loop_state(resume_path, step, modules, optimizer, scheduler, generator)
    oracle = Oracle(reader.eval().requires_grad_(False), encoder.eval().requires_grad_(False))
    log(f"oracle validation: {validation_report(oracle, valid)}")
    return oracle


def validation_report(oracle: Oracle, valid: RenderedSet) -> dict[str, float]:
    """Per-attribute accuracy on held-out renders and subject accuracy (nearest prototype)."""
    read = oracle.read(valid.images)
    report = {}
    for name in ATTRIBUTES:
        pairs = [(r[name], s.attributes()[name]) for r, s in zip(read, valid.scenes) if name in s.attributes()]
        report[name] = float(np.mean([a == b for a, b in pairs]))
    with torch.no_grad():
        predicted = oracle.encoder.logits(oracle.subject_embeddings(valid.images)).argmax(dim=1)
    report["subject"] = float((predicted == subject_labels(valid)).float().mean())
    return {k: round(v, 4) for k, v in report.items()}


@torch.no_grad()
def generalization_report(oracle: Oracle, fresh: int = 24) -> dict:
    """Subject fidelity on subjects the encoder never saw: the named concepts and `fresh` procedural seeds.

    For each subject: its 12 evaluation scenes rendered exactly (what a perfect personalized model
    would draw) against its own references ("own", the bar is ≥ 0.75), and against every other
    subject's references ("other", the bar is ≤ 0.35 for the worst pair).
    """
    subjects = [CONCEPTS[name] for name in sorted(CONCEPTS)]
    subjects += [procedural_subject(seed) for seed in VALIDATION_SEEDS.seeds()[:fresh]]
    renders, references = {}, {}
    for subject in subjects:
        rng = np.random.default_rng(len(renders) + 77)  # the evaluation scenes' layouts
        renders[subject.name] = np.stack([render(p.scene, rng) for p in evaluation_prompts(subject)])
        references[subject.name] = reference_images(subject)
    own, worst_other = {}, {}
    for name, images in renders.items():
        own[name] = oracle.subject_fidelity(images, references[name])
        others = {other: oracle.subject_fidelity(images, refs) for other, refs in references.items() if other != name}
        worst = max(others, key=others.get)
        worst_other[name] = (worst, others[worst])
    named = [s.name for s in subjects if not is_procedural(s.name)]
    return {
        "own": {k: round(v, 4) for k, v in own.items()},
        "worst_other": {k: [w, round(v, 4)] for k, (w, v) in worst_other.items()},
        "min_own_named": round(min(own[n] for n in named), 4),
        "min_own_fresh": round(min(v for k, v in own.items() if k not in named), 4),
        "mean_own": round(float(np.mean(list(own.values()))), 4),
        "max_other": round(max(v for _, v in worst_other.values()), 4),
        "mean_other": round(float(np.mean([v for _, v in worst_other.values()])), 4),
    }
