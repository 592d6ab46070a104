"""Training the oracles on renders of the world and of procedural subjects, in random contexts.

The attribute reader learns the grammar's attributes by classification. The subject encoder
learns subject identity contrastively (supervised contrastive loss, Khosla et al. 2020): each
batch holds two pictures of each of P subjects in different scenes, drawn from a pool of
thousands of procedural subjects and the grammar's coloured shapes, and an embedding must find
its partner among the other 2P - 1. Nothing ties it to a fixed list of classes, so it scores
subjects it never saw by the same cosine. It is validated on such subjects
(`generalization_report`): the six named concepts and fresh procedural seeds, each rendered in
its evaluation contexts and compared with its references (as a personalized model's pictures
are) and with every other subject's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .concepts import CONCEPTS, Concept, reference_images
from .data import RenderedSet, subject_scene
from .evaluate import exact_evaluation_renders
from .grammar import ATTRIBUTES, COLORS, SHAPES, Scene, sample_scene
from .oracle import GRAMMAR_SUBJECTS, AttributeReader, Oracle, SubjectEncoder
from .procedural import ORACLE_SEEDS, VALIDATION_SEEDS, SeedRange, is_procedural, lookup_subject, procedural_subject
from .render import render
from .training import Log, Meter, make_optimizer, restore_loop_state, save_loop_state

IGNORE = -100  # cross_entropy's ignore_index: a concept has no grammar shape or colour
GRAMMAR_SHARE = 0.1  # share of pool subjects that are a plain coloured shape ("a red circle")


@dataclass(frozen=True)
class OracleSettings:
    images: int = 12000  # the reader's training renders
    reader_steps: int = 1500
    reader_batch: int = 64
    subjects: int = 4000  # distinct subjects in the encoder's pool, each drawn in `views` scenes
    views: int = 4
    steps: int = 1500  # the encoder's steps
    subjects_per_batch: int = 48  # P: a batch is two views of each of P subjects
    temperature: float = 0.1  # of the contrastive softmax over cosines (SupCon's default)
    # Weight of mean(max(0, cos)²) over the batch's pairs of different subjects. SupCon only ranks a subject's
    # partner above the others, so unrelated subjects may stay at cosine 0.4-0.6; the metric reports
    # max(0, cos), so this term pulls them to 0 or below, where an unrelated subject scores nothing.
    negative_weight: float = 0.0
    # Weight of mean over anchors of max(0, cos to the most similar other subject - hardest_margin)²: the metric's
    # "other" bar is about each subject's closest look-alike, which neither loss above singles out.
    hardest_weight: float = 0.0
    hardest_margin: float = 0.25
    # Then `hard_steps` more steps on batches of look-alikes: each batch is `subjects_per_batch / neighbours`
    # random anchors with `neighbours - 1` of their nearest pool subjects (mined every `mine_every` steps from the
    # encoder as it is), so the softmax's negatives are the subjects a random batch almost never pairs up.
    hard_steps: int = 0
    neighbours: int = 4
    mine_every: int = 250
    # Or then `twin_steps` more steps on batches of subjects with their outline twins (procedural_subject's
    # `outline`: same colours and decorations, another shape), `twin_pairs` of them drawn for the purpose.
    twin_steps: int = 0
    twin_pairs: int = 4000
    refine_lr: float = 5e-4  # of either refinement
    lr: float = 2e-3
    warmup: int = 50
    checkpoint_every: int = 200


@dataclass
class SubjectViews:
    """Pictures of subjects in random scenes: `images` (S·V, 64, 64, 3) uint8, subject-major;
    `labels` (S·V,) identity per picture (equal labels = one subject, even if drawn twice)."""

    images: np.ndarray
    labels: np.ndarray
    views: int


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


def _pool_subject(rng: np.random.Generator, seeds: SeedRange) -> tuple[int, Concept | tuple[str, str]]:
    """(label, subject): a procedural subject of `seeds`, or a grammar (colour, shape) pair."""
    if rng.random() < GRAMMAR_SHARE:
        color, shape = str(rng.choice(COLORS)), str(rng.choice(SHAPES))
        return GRAMMAR_SUBJECTS.index(f"{color} {shape}"), (color, shape)
    seed = int(rng.integers(seeds.start, seeds.stop))
    return len(GRAMMAR_SUBJECTS) + seed, procedural_subject(seed)


def _view(subject: Concept | tuple[str, str], rng: np.random.Generator) -> np.ndarray:
    if isinstance(subject, Concept):
        return render(subject_scene(subject, rng), rng)
    color, shape = subject
    scene = sample_scene(rng, shape)
    if scene.color != color:  # keep the subject's colour; the background must differ from it
        backgrounds = [c for c in COLORS if c != color]
        scene = Scene(shape, color, scene.size, scene.position, str(rng.choice(backgrounds)), scene.bg_pattern)
    return render(scene, rng)


def subject_views(subjects: int, views: int, seed: int, seeds: SeedRange = ORACLE_SEEDS) -> SubjectViews:
    """`subjects` subjects from `seeds` (and the grammar's coloured shapes), each in `views` random scenes.

    Picture (i, v) depends only on (seed, i, v). Raises ValueError for fewer than two views.
    """
    if views < 2:
        raise ValueError(f"a contrastive pool needs at least two views per subject, got {views}")
    images, labels = [], []
    for i in range(subjects):
        rng = np.random.default_rng([seed, i])
        label, subject = _pool_subject(rng, seeds)
        images.extend(_view(subject, rng) for _ in range(views))
        labels.extend([label] * views)
    return SubjectViews(np.stack(images), np.asarray(labels, dtype=np.int64), views)


def negative_cosine_penalty(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean(max(0, cos)²) over pairs of pictures of different subjects: embeddings (B, D) unit length -> scalar."""
    negatives = labels[:, None] != labels[None, :]
    return ((embeddings @ embeddings.T).clamp(min=0) ** 2)[negatives].mean()


def hardest_negative_hinge(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """mean over anchors of max(0, cos to its most similar picture of another subject - margin)²:
    embeddings (B, D) unit length, labels (B,) -> scalar. A triplet-style hinge on the hardest negative
    (Hermans et al., 2017, "batch hard"), without the positive term SupCon already provides."""
    similarity = (embeddings @ embeddings.T).masked_fill(labels[:, None] == labels[None, :], -1.0)
    return (similarity.max(dim=1).values - margin).clamp(min=0).pow(2).mean()


def supervised_contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon (Khosla et al., 2020, eq. 2): embeddings (B, D) unit length, labels (B,) -> scalar.

    For each anchor, the mean log-probability of its positives (same label, not itself) under a
    softmax over the cosines to every other picture of the batch; anchors without a positive are skipped.
    """
    similarity = embeddings @ embeddings.T / temperature  # (B, B)
    itself = torch.eye(len(labels), dtype=torch.bool, device=embeddings.device)
    similarity = similarity.masked_fill(itself, float("-inf"))
    positives = (labels[:, None] == labels[None, :]) & ~itself
    log_prob = (similarity - similarity.logsumexp(dim=1, keepdim=True)).masked_fill(itself, 0.0)
    has_positive = positives.any(dim=1)
    per_anchor = -(log_prob * positives).sum(dim=1) / positives.sum(dim=1).clamp(min=1)
    return per_anchor[has_positive].mean()


def _pairs_batch(pool: SubjectViews, subjects: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of two different views of each of `subjects` distinct pool subjects: (2·subjects,)."""
    count = len(pool.labels) // pool.views
    return _two_views(pool, torch.randperm(count, generator=generator)[:subjects], generator)


def _two_views(pool: SubjectViews, subjects: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Picture indices of two different random views of each of `subjects` (pool subject numbers, (P,)):
    (2P,), all the first views, then all the second ones."""
    first = torch.randint(0, pool.views, (len(subjects),), generator=generator)
    second = (first + torch.randint(1, pool.views, (len(subjects),), generator=generator)) % pool.views
    return torch.cat([subjects * pool.views + first, subjects * pool.views + second])


@torch.no_grad()
def nearest_subjects(encoder: SubjectEncoder, pool: SubjectViews, count: int, chunk: int = 1024) -> torch.Tensor:
    """(S, count) indices of each pool subject's `count` nearest other subjects, by the cosine of the embeddings
    of their first views; a subject drawn twice in the pool (equal labels) is never its own neighbour."""
    was_training = encoder.training
    encoder.eval()
    first = torch.from_numpy(pool.images[:: pool.views]).permute(0, 3, 1, 2)  # (S, 3, 64, 64) uint8
    labels = torch.from_numpy(pool.labels[:: pool.views])
    embeddings = torch.cat([encoder(first[i : i + chunk].float() / 127.5 - 1) for i in range(0, len(first), chunk)])
    nearest = []
    for i in range(0, len(first), chunk):
        similarity = embeddings[i : i + chunk] @ embeddings.T  # (chunk, S)
        similarity[labels[i : i + chunk, None] == labels[None, :]] = -2.0  # itself, and itself drawn twice
        nearest.append(similarity.topk(count, dim=1).indices)
    encoder.train(was_training)
    return torch.cat(nearest)


def _hard_batch(pool: SubjectViews, nearest: torch.Tensor, subjects: int, neighbours: int,
                generator: torch.Generator) -> torch.Tensor:
    """Two different views of `subjects` distinct subjects in groups of look-alikes: (2·subjects,) indices.

    Each group is a random anchor and `neighbours - 1` subjects drawn from its mined nearest ones (those
    already in the batch skipped); a group that runs short is filled with random subjects.
    """
    count = len(pool.labels) // pool.views
    chosen: list[int] = []
    taken: set[int] = set()
    order = torch.randperm(count, generator=generator).tolist()
    for anchor in order:
        if len(chosen) >= subjects:
            break
        if anchor in taken:
            continue
        group = [anchor]
        for candidate in nearest[anchor][torch.randperm(nearest.shape[1], generator=generator)].tolist():
            if len(group) == neighbours or len(chosen) + len(group) == subjects:
                break
            if candidate not in taken and candidate not in group:
                group.append(candidate)
        chosen.extend(group)
        taken.update(group)
    picked = torch.tensor(chosen[:subjects])
    return _two_views(pool, picked, generator)


def outline_twin_views(pairs: int, views: int, seed: int, seeds: SeedRange = ORACLE_SEEDS) -> SubjectViews:
    """`pairs` procedural subjects of `seeds`, each followed by its outline twin (a random other shape), each
    drawn in `views` random scenes: subject 2i is a subject, 2i + 1 its twin. A twin's label is negative and
    unique to (seed, shape), so it never equals a subject's label (GRAMMAR_SUBJECTS + seed, as subject_views).

    Picture (i, v) depends only on (seed, i, v). Raises ValueError for fewer than two views.
    """
    if views < 2:
        raise ValueError(f"a contrastive pool needs at least two views per subject, got {views}")
    images, labels = [], []
    for i in range(pairs):
        rng = np.random.default_rng([seed, i, 1])
        number = int(rng.integers(seeds.start, seeds.stop))
        subject = procedural_subject(number)
        shape = str(rng.choice([s for s in SHAPES if s != subject.class_word]))
        for concept, label in ((subject, len(GRAMMAR_SUBJECTS) + number),
                               (procedural_subject(number, outline=shape), -1 - (number * len(SHAPES) + SHAPES.index(shape)))):
            images.extend(render(subject_scene(concept, rng), rng) for _ in range(views))
            labels.extend([label] * views)
    return SubjectViews(np.stack(images), np.asarray(labels, dtype=np.int64), views)


def _twin_batch(pool: SubjectViews, subjects: int, generator: torch.Generator) -> torch.Tensor:
    """Two different views of `subjects // 2` random subjects and of each one's twin: (2·subjects,) indices."""
    pairs = len(pool.labels) // pool.views // 2
    chosen = torch.randperm(pairs, generator=generator)[: subjects // 2]
    picked = torch.stack([2 * chosen, 2 * chosen + 1], dim=1).flatten()
    return _two_views(pool, picked, generator)


def refine_on_outline_twins(encoder: SubjectEncoder, twins: SubjectViews, settings: OracleSettings, seed: int,
                            log: Log, resume_path: Path | None = None) -> SubjectEncoder:
    """`settings.twin_steps` contrastive steps on batches of subjects and their outline twins (_twin_batch).

    Counterfactual negatives against a shortcut: an encoder that matches subjects by their palette scores a
    ring and a star in the same colours as one subject (docs/quality.md); a batch holding both, as different
    subjects, can only be ranked right by the outline.
    """
    generator = torch.Generator().manual_seed(seed + 9)
    return _contrastive_phase(encoder, twins, settings, "outline twins", settings.twin_steps, settings.refine_lr,
                              generator, lambda step: _twin_batch(twins, settings.subjects_per_batch, generator), log,
                              resume_path)


def _resume_file(resume_path: Path | None, part: str) -> Path | None:
    return None if resume_path is None else resume_path.with_name(f"{resume_path.stem}_{part}{resume_path.suffix}")


def train_attribute_reader(train: RenderedSet, settings: OracleSettings, seed: int, log: Log,
                           resume_path: Path | None = None) -> AttributeReader:
    """The reader, by cross-entropy on every attribute a scene has, on degraded renders."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 3)
    reader = AttributeReader().train()
    optimizer, scheduler = make_optimizer(
        [{"params": list(reader.parameters()), "lr": settings.lr, "weight_decay": 1e-4}],
        settings.reader_steps, settings.warmup,
    )
    pixels = torch.from_numpy(train.images).permute(0, 3, 1, 2)  # (N, 3, 64, 64) uint8
    attributes = attribute_labels(train)
    modules = {"reader": reader}
    first = restore_loop_state(resume_path, modules, optimizer, scheduler, generator, log, "reader",
                               settings.reader_steps)
    meter = Meter()
    for step in range(first, settings.reader_steps + 1):
        index = torch.randint(0, len(pixels), (settings.reader_batch,), generator=generator)
        logits = reader(degrade(pixels[index].float() / 127.5 - 1, generator))
        loss = sum(F.cross_entropy(logits[n], attributes[n][index], ignore_index=IGNORE) for n in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        meter.add(reader=loss.item())
        if step % 100 == 0 or step == settings.reader_steps:
            log(f"reader {meter.line(step, settings.reader_steps)}")
        if resume_path is not None and (step % settings.checkpoint_every == 0 or step == settings.reader_steps):
            save_loop_state(resume_path, step, modules, optimizer, scheduler, generator)
    return reader.eval().requires_grad_(False)


def train_subject_encoder(pool: SubjectViews, settings: OracleSettings, seed: int, log: Log,
                          resume_path: Path | None = None) -> SubjectEncoder:
    """The encoder, by the supervised contrastive loss over two degraded, randomly mirrored views per subject,
    plus `settings.negative_weight` × negative_cosine_penalty."""
    torch.manual_seed(seed + 1)
    generator = torch.Generator().manual_seed(seed + 5)
    encoder = SubjectEncoder().train()
    return _contrastive_phase(encoder, pool, settings, "encoder", settings.steps, settings.lr, generator,
                              lambda step: _pairs_batch(pool, settings.subjects_per_batch, generator), log,
                              resume_path)


def _contrastive_phase(encoder: SubjectEncoder, pool: SubjectViews, settings: OracleSettings, name: str, steps: int,
                       lr: float, generator: torch.Generator, batch_of: Callable[[int], torch.Tensor], log: Log,
                       resume_path: Path | None, extra: dict[str, torch.nn.Module] | None = None) -> SubjectEncoder:
    """`steps` contrastive steps (_encoder_step) on the pool pictures `batch_of(step)` picks, AdamW at `lr` with
    warm-up and cosine decay; the loop state (with the `extra` modules) saved every `settings.checkpoint_every`
    steps at `resume_path` and picked up from there. Logs as `name`; returns the encoder in eval mode, frozen."""
    encoder.train().requires_grad_(True)
    optimizer, scheduler = make_optimizer(
        [{"params": list(encoder.parameters()), "lr": lr, "weight_decay": 1e-4}], steps, settings.warmup,
    )
    pixels, labels = torch.from_numpy(pool.images).permute(0, 3, 1, 2), torch.from_numpy(pool.labels)
    modules = {"encoder": encoder, **(extra or {})}
    first = restore_loop_state(resume_path, modules, optimizer, scheduler, generator, log, name, steps)
    meter = Meter()
    for step in range(first, steps + 1):
        _encoder_step(encoder, optimizer, scheduler, pixels, labels, batch_of(step), settings, generator, meter)
        if step % 100 == 0 or step == steps:
            log(f"{name} {meter.line(step, steps)}")
        if resume_path is not None and step % settings.checkpoint_every == 0 and step < steps:
            save_loop_state(resume_path, step, modules, optimizer, scheduler, generator)
    return encoder.eval().requires_grad_(False)


def _encoder_step(encoder: SubjectEncoder, optimizer, scheduler, pixels: torch.Tensor, labels: torch.Tensor,
                  index: torch.Tensor, settings: OracleSettings, generator: torch.Generator, meter: Meter) -> None:
    """One contrastive step on the pool pictures `index`: degraded, half of them mirrored."""
    batch = degrade(pixels[index].float() / 127.5 - 1, generator)
    # A mirror image is the same subject, so mirrored views are positives too.
    batch = torch.where((torch.rand(len(index), generator=generator) < 0.5).view(-1, 1, 1, 1), batch.flip(-1), batch)
    embeddings = encoder(batch)
    contrastive = supervised_contrastive_loss(embeddings, labels[index], settings.temperature)
    penalty = negative_cosine_penalty(embeddings, labels[index])
    hardest = hardest_negative_hinge(embeddings, labels[index], settings.hardest_margin)
    loss = contrastive + settings.negative_weight * penalty + settings.hardest_weight * hardest
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    meter.add(encoder=contrastive.item(), negatives=penalty.item(), hardest=hardest.item())


class _Mined(torch.nn.Module):
    """The mined neighbours (subjects, count) as a buffer: saved and restored with the loop state."""

    def __init__(self, subjects: int, count: int) -> None:
        super().__init__()
        self.register_buffer("nearest", torch.zeros(subjects, count, dtype=torch.long))


def refine_on_look_alikes(encoder: SubjectEncoder, pool: SubjectViews, settings: OracleSettings, seed: int,
                          log: Log, resume_path: Path | None = None) -> SubjectEncoder:
    """`settings.hard_steps` contrastive steps on batches of look-alike subjects (_hard_batch), from `encoder`.

    Hard-negative mining as in metric learning (e.g. Schroff et al., FaceNet, 2015; Robinson et al., 2021):
    a random batch of 64 among 16,000 subjects rarely holds two that share body colour, pattern and
    decorations, so after the first phase the loss no longer separates them (cosines 0.4-0.7 between
    look-alikes, docs/quality.md). The neighbours are mined from the encoder every `mine_every` steps.
    """
    generator = torch.Generator().manual_seed(seed + 7)
    # Mined per subject: a group draws `neighbours - 1` of them. Kept in the loop state, so that a resumed run
    # uses the neighbours the cut one had mined, not ones mined from later weights.
    mined = _Mined(len(pool.labels) // pool.views, max(2 * settings.neighbours, 8))

    def batch_of(step: int) -> torch.Tensor:
        if (step - 1) % settings.mine_every == 0:
            mined.nearest.copy_(nearest_subjects(encoder, pool, mined.nearest.shape[1]))
        return _hard_batch(pool, mined.nearest, settings.subjects_per_batch, settings.neighbours, generator)

    return _contrastive_phase(encoder, pool, settings, "look-alikes", settings.hard_steps, settings.refine_lr,
                              generator, batch_of, log, resume_path, extra={"mined": mined})


def train_oracles(train: RenderedSet, valid: RenderedSet, pool: SubjectViews, settings: OracleSettings, seed: int,
                  log: Log, resume_path: Path | None = None) -> Oracle:
    """The reader on `train`, then the encoder on `pool`; validated on `valid` and fresh subjects.

    With `resume_path` (e.g. ckpt/oracle_running.pt), each loop's state is saved every
    `settings.checkpoint_every` steps beside it (<stem>_reader.pt, <stem>_encoder.pt, <stem>_hard.pt, <stem>_twins.pt) and picked
    up when it exists, as the teacher stage does; the caller removes them when done.
    """
    reader = train_attribute_reader(train, settings, seed, log, _resume_file(resume_path, "reader"))
    encoder = train_subject_encoder(pool, settings, seed, log, _resume_file(resume_path, "encoder"))
    if settings.hard_steps:
        encoder = refine_on_look_alikes(encoder, pool, settings, seed, log, _resume_file(resume_path, "hard"))
    if settings.twin_steps:
        twins = outline_twin_views(settings.twin_pairs, settings.views, seed + 60_000)
        encoder = refine_on_outline_twins(encoder, twins, settings, seed, log, _resume_file(resume_path, "twins"))
    oracle = Oracle(reader, encoder)
    log(f"oracle validation: {validation_report(oracle, valid)}")
    return oracle


def validation_report(oracle: Oracle, valid: RenderedSet, subjects: int = 200) -> dict[str, float]:
    """Per-attribute accuracy on held-out renders, and subject retrieval on subjects never trained on.

    "subject": the share of pictures whose nearest other picture (cosine) shows the same subject,
    among 4 views each of `subjects` fresh validation subjects (chance ≈ 3 / (4·subjects)).
    """
    read = oracle.read(valid.images)
    report = {}
    for name in ATTRIBUTES:
        pairs = [(r[name], s.attributes()[name]) for r, s in zip(read, valid.scenes) if name in s.attributes()]
        report[name] = float(np.mean([a == b for a, b in pairs]))
    fresh = VALIDATION_SEEDS.start + 50_000  # clear of the seeds the demo and generalization_report use
    held_out = subject_views(subjects, 4, seed=0, seeds=SeedRange(fresh, VALIDATION_SEEDS.stop))
    embeddings = oracle.subject_embeddings(held_out.images)
    similarity = (embeddings @ embeddings.T).fill_diagonal_(-2.0)
    nearest = similarity.argmax(dim=1)
    labels = torch.from_numpy(held_out.labels)
    report["subject"] = float((labels[nearest] == labels).float().mean())
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
        renders[subject.name] = exact_evaluation_renders(subject, len(renders) + 77)
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
