"""`echodistill bench world-probe`: can the paper's teacher adapter learn a subject in this world at all?

The bar a mini world must clear before any quality table is read: the teacher ALONE, trained with
the paper's teacher adapter (Custom Diffusion: cross-attention K/V deltas + the concept token row,
the plain masked denoising loss, the augmentation bounded for the world's size), must learn each
held-out subject within a few hundred steps — mean subject fidelity ≥ 0.50 on the evaluation
prompts at prompt fidelity ≥ 0.80. If it cannot, the world cannot hold a subject where the paper
puts it, and no method's row says anything about the method.

Each subject trains on a fresh borrow of the pair (`pristine`), from its references and their
grammar captions, then the teacher (25 DDIM steps, CFG 7.5) draws the subject's 12 evaluation
prompts and the oracle scores them; the untrained teacher's class-word prior is scored the same way.
The teacher also redraws the five references from their own captions with the token ("fit"): low
there too means the trained teacher cannot draw the subject at all, not that it fails to generalize.
Each subject is probed with `settings.seeds` seeds (training draws and evaluation noise); the mean
runs over subjects x seeds. With `trainable="unet"` every UNet weight trains instead of the K/V deltas, with
`lr=0` the token row trains alone, and with `prior_weight > 0` Custom Diffusion's class-prior term joins the
loss: each is a diagnostic, not the bar (`ProbeSettings.diagnostics`).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..imaging import labelled_rows, save_png
from ..miniworld.concepts import Concept, reference_captions
from ..miniworld.evaluate import vae_round_trip_fidelity
from ..miniworld.grammar import SHAPES, describe, sample_scene
from ..miniworld.oracle import Oracle
from ..miniworld.recipe import RESOLUTION, TOKEN
from ..miniworld.scoring import TEACHER_GUIDANCE, TEACHER_PRIOR, TEACHER_STEPS, UnitInputs, score_prior
from ..models.adapters import add_custom_diffusion
from ..models.concept import add_concept_token, concept_parameters
from ..models.diffusion import alphas_cumprod_for, encode_prompts, unet_call
from ..models.pair import ModelPair
from ..models.pristine import pristine
from ..models.schedule import add_noise, denoising_target
from ..files import make_folder
from ..models.tensor_files import atomic_write_text
from ..sampling.samplers import sample_teacher
from ..training.data import ConceptDataset
from ..training.losses import masked_denoising_loss
from .probe_settings import PROMPT_BAR, SUBJECT_BAR, ProbeSettings, check_baseline


def probe_subject(pair: ModelPair, oracle: Oracle, concept: Concept, settings: ProbeSettings,
                  log: Callable[[str], None] = print,
                  class_prior: tuple[torch.Tensor, list[str]] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Train the teacher's K/V + token row on `concept` inside a borrow of `pair`; score its 25-step pictures.

    One seed: `settings.seed` (run_world_probe loops over the seeds). `class_prior`: the class pictures'
    latents (P, 4, 16, 16) and prompts, from `class_prior_set`; needed when `settings.prior_weight > 0`.
    Returns the record (subject and prompt fidelity, fit, seconds) and the sheet's rows: {label: (N, 3, 64, 64)
    pictures in [0, 1]}.
    """
    if settings.prior_weight > 0 and class_prior is None:
        raise ValueError("prior_weight > 0 needs the class pictures: pass class_prior=class_prior_set(...)")
    unit = UnitInputs.build(concept, settings.seed, settings.images_per_prompt, captions=True)
    own_captions = [caption.format(f"{TOKEN} {concept.class_word}") for caption in reference_captions(concept)]
    with pristine(pair) as borrowed, _restored(borrowed.teacher.unet, settings.trainable == "unet"):
        torch.manual_seed(settings.seed)
        add_concept_token(borrowed.tokenizer, borrowed.text_encoder, TOKEN, concept.class_word)
        unet = borrowed.teacher.unet
        if settings.trainable == "unet":
            trained = list(unet.requires_grad_(True).parameters())
            rate = {"weight_decay": 0.0}  # DreamBooth's: weight decay would pull every weight toward zero
        else:
            trained, rate = add_custom_diffusion(unet), {}
        optimizer = torch.optim.AdamW([
            {"params": trained, "lr": settings.lr, **rate},
            {"params": concept_parameters(borrowed.text_encoder), "lr": settings.token_lr, "weight_decay": 0.0},
        ])
        dataset = ConceptDataset(unit.images, token=TOKEN, class_word=concept.class_word, resolution=RESOLUTION,
                                 latent_scale=borrowed.vae_downscale, min_scale=settings.min_scale)
        alphas_cumprod = alphas_cumprod_for(borrowed.teacher.scheduler_config)  # (T,)
        data = torch.Generator().manual_seed(settings.seed)
        draws = torch.Generator().manual_seed(settings.seed + 1)
        vae = borrowed.vae
        started, losses = time.time(), []
        for step in range(1, settings.steps + 1):
            batch = dataset.sample_batch(settings.batch, data)
            with torch.no_grad():
                latents = vae.encode(batch.pixel_values).latent_dist.mean * vae.config.scaling_factor  # (B, 4, 16, 16)
            prompts = batch.prompts
            if settings.prior_weight > 0:  # as many class pictures as subject ones, in the same UNet call
                pick = torch.randint(0, len(class_prior[1]), (settings.batch,), generator=data)
                latents = torch.cat([latents, class_prior[0][pick]])  # (2B, 4, 16, 16)
                prompts = prompts + [class_prior[1][i] for i in pick.tolist()]
            encoder_hidden_states = encode_prompts(borrowed.tokenizer, borrowed.text_encoder, prompts)
            noise = torch.randn(latents.shape, generator=draws)
            timesteps = torch.randint(0, len(alphas_cumprod), (len(latents),), generator=draws)
            prediction = unet_call(unet, add_noise(latents, noise, timesteps, alphas_cumprod), timesteps,
                                   encoder_hidden_states)
            target = denoising_target(latents, noise, timesteps, alphas_cumprod, borrowed.teacher.prediction_type)
            b = settings.batch
            loss = masked_denoising_loss(prediction[:b], target[:b], batch.mask).mean()
            if settings.prior_weight > 0:  # Custom Diffusion's prior term: the whole class picture, no mask
                loss = loss + settings.prior_weight * (prediction[b:].float() - target[b:].float()).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if step % 100 == 0 or step == settings.steps:
                log(f"{concept.name}: step {step}/{settings.steps} loss {sum(losses[-100:]) / len(losses[-100:]):.4f}")
        seconds = time.time() - started
        with torch.no_grad():  # the adapted pair in place: sample_teacher, not a second borrow
            images = sample_teacher(borrowed, unit.texts, seeds=unit.noise_seeds, steps=TEACHER_STEPS,
                                    guidance=TEACHER_GUIDANCE, width=RESOLUTION, height=RESOLUTION,
                                    return_latents=False).images  # (12·k, 3, 64, 64)
            refit = sample_teacher(borrowed, own_captions, seeds=[s + FIT_SEED for s in range(len(own_captions))],
                                   steps=TEACHER_STEPS, guidance=TEACHER_GUIDANCE, width=RESOLUTION,
                                   height=RESOLUTION, return_latents=False).images  # (5, 3, 64, 64)
    record = {"concept": concept.name, "seed": settings.seed, **unit.score(oracle, images),
              "train_seconds": round(seconds, 1),
              "fit_subject_fidelity": float(oracle.subject_fidelity(refit, unit.reference_pixels)),
              "subject_fidelity_by_size": fidelity_by_size(oracle, images, unit),
              "vae_ceiling": vae_round_trip_fidelity(pair.vae, oracle, concept)}
    prior, prior_images = score_prior(pair, oracle, unit, TEACHER_PRIOR)
    record["prior_subject_fidelity"] = prior["subject_fidelity"]
    record["prior_prompt_fidelity"] = prior["prompt_fidelity"]
    return record, {"references": unit.reference_pixels, "teacher, own captions (fit)": refit,
                    "teacher, trained": images, "teacher, class word": prior_images}


FIT_SEED = 900_000  # noise seeds of the references' redraws: clear of the evaluation prompts' (seed·100,000 + i)


@contextlib.contextmanager
def _restored(unet: torch.nn.Module, active: bool) -> Iterator[None]:
    """Put back every weight of `unet` on exit when `active` (training the whole UNet changes it in place, and
    `pristine` only removes adapters)."""
    saved = {name: tensor.detach().clone() for name, tensor in unet.state_dict().items()} if active else None
    try:
        yield
    finally:
        if saved is not None:
            unet.load_state_dict(saved)


def fidelity_by_size(oracle: Oracle, images: torch.Tensor, unit: UnitInputs) -> dict[str, float]:
    """Subject fidelity of the pictures (N, 3, 64, 64) whose prompt asks for a small / large subject.

    A small subject is 12–16 pixels across, 3–4 latent cells: where a base teacher draws shapes worst.
    """
    sizes = [stated.get("size") for stated in unit.stated]
    return {size: float(oracle.subject_fidelity(images[[s == size for s in sizes]], unit.reference_pixels))
            for size in ("small", "large") if size in sizes}


PRIOR_NOISE_SEED = 1_000_000_000  # the class pictures' noise: clear of every evaluation and fit seed


@torch.no_grad()
def class_prior_set(pair: ModelPair, class_word: str, count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """The untrained teacher's own pictures of the class word, for Custom Diffusion's class-prior term.

    Prompts are random scenes of the world's grammar with the class word as the object and no colour stated
    ("a large ring on the left, on a blue striped background"), drawn as the bar's evaluation pictures are
    (25 DDIM steps, CFG 7.5). Returns their latents (count, 4, 16, 16), in the UNet's scaled space, and the
    prompts. Raises ValueError for a class word the grammar has no shape for.
    """
    if class_word not in SHAPES:
        raise ValueError(f"class word {class_word!r}: the world's grammar draws only {', '.join(SHAPES)}")
    rng = np.random.default_rng([seed, PRIOR_NOISE_SEED])
    prompts = []
    for _ in range(count):
        scene = sample_scene(rng, subject=class_word)
        prompts.append(describe(scene, frozenset(scene.attributes()) - {"color"}).text)
    seeds = [PRIOR_NOISE_SEED + seed * 10_000 + i for i in range(count)]
    latents = torch.cat([
        sample_teacher(pair, prompts[i : i + 50], seeds=seeds[i : i + 50], steps=TEACHER_STEPS,
                       guidance=TEACHER_GUIDANCE, width=RESOLUTION, height=RESOLUTION).latents
        for i in range(0, count, 50)])  # (count, 4, 16, 16)
    return latents, prompts


def run_world_probe(pair: ModelPair, oracle: Oracle, concepts: Sequence[Concept], settings: ProbeSettings,
                    out: str | Path, extra: dict | None = None, log: Callable[[str], None] = print,
                    baseline: tuple[str, dict] | None = None) -> dict:
    """Probe every concept with every seed; write world_probe.json, world_probe.md and one sheet per concept and
    seed into `out`. The mean runs over subjects x seeds; its standard error over the subjects' own means.

    `baseline`: (its path, an earlier world_probe.json's content) to report the paired difference against
    (`paired_difference`); raises ValueError, before any training, when the two share no subject and seed.
    """
    if baseline is not None:  # refuse a baseline with nothing to pair before hours of work
        check_baseline(concepts, settings, baseline[1])
    out = Path(out)
    make_folder(out / "sheets")  # the command line removes it again if the probe fails or is stopped
    records, priors = [], {}
    for concept in concepts:
        for seed in range(settings.seed, settings.seed + settings.seeds):
            one = replace(settings, seed=seed)
            class_prior = None
            if settings.prior_weight > 0:  # drawn once per class word and seed, by the untrained teacher
                key = (concept.class_word, seed)
                if key not in priors:
                    log(f"drawing {settings.prior_images} class pictures of '{concept.class_word}' (seed {seed})")
                    priors[key] = class_prior_set(pair, concept.class_word, settings.prior_images, seed)
                class_prior = priors[key]
            record, rows = probe_subject(pair, oracle, concept, one, log, class_prior)
            records.append(record)
            log(f"{concept.name} (seed {seed}): subject fidelity {record['subject_fidelity']:.3f} (prior "
                f"{record['prior_subject_fidelity']:.3f}), prompt fidelity {record['prompt_fidelity']:.3f}, "
                f"own captions {record['fit_subject_fidelity']:.3f}")
            save_png(labelled_rows(list(rows.items())), out / "sheets" / f"{concept.name}_seed{seed}.png",
                     {"concept": concept.name, "seed": str(seed)})
    mean = {key: sum(r[key] for r in records) / len(records)
            for key in ("subject_fidelity", "prompt_fidelity", "fit_subject_fidelity", "prior_subject_fidelity",
                        "prior_prompt_fidelity", "vae_ceiling")}
    by_subject = {c.name: statistics.fmean([r["subject_fidelity"] for r in records if r["concept"] == c.name])
                  for c in concepts}
    report = {
        "settings": {**asdict(settings), **(extra or {})},
        "records": records,
        "mean": mean,
        "subject_fidelity_by_subject": by_subject,
        "standard_error": standard_error(list(by_subject.values())),
        "bar": {"subject_fidelity": SUBJECT_BAR, "prompt_fidelity": PROMPT_BAR},
        # only the paper's adapter, with the plain loss, can pass: every other run is a diagnostic
        "fair": (not settings.diagnostics() and mean["subject_fidelity"] >= SUBJECT_BAR
                 and mean["prompt_fidelity"] >= PROMPT_BAR),
    }
    if baseline is not None:
        report["compared_with"] = {"path": baseline[0], **paired_difference(report, baseline[1])}
    earlier = _sheet_names(out / "world_probe.json")  # the report this one replaces, if any
    atomic_write_text(out / "world_probe.json", json.dumps(report, indent=2))
    atomic_write_text(out / "world_probe.md", markdown(report))
    for stale in earlier - _sheet_names(records):  # the replaced probe's own sheets, only now this one is written
        (out / "sheets" / stale).unlink(missing_ok=True)
    return report


def _sheet_names(source: Path | list[dict]) -> set[str]:
    """The sheet file names of a probe's records, or of the world_probe.json at `source` (none if unreadable):
    only those are ever removed, never a picture another command or the user put in sheets/."""
    if isinstance(source, Path):
        try:
            source = json.loads(source.read_text(encoding="utf-8")).get("records", [])
        except (OSError, ValueError, AttributeError):
            return set()
    return {f"{r['concept']}_seed{r['seed']}.png" for r in source
            if isinstance(r, dict) and isinstance(r.get("concept"), str) and isinstance(r.get("seed"), int)
            and "/" not in r["concept"] and "\\" not in r["concept"] and not r["concept"].startswith(".")}


def standard_error(values: Sequence[float]) -> float | None:
    """Standard error of the mean of `values` (sample std / √n, as quality_report pairs rows); None for fewer
    than two."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def paired_difference(report: dict, baseline: dict) -> dict:
    """This report's subject fidelity minus `baseline`'s, paired on the (subject, seed) both probed.

    Returns {"pairs": n, "mean": mean difference, "standard_error": over the subjects' mean differences
    (None for one subject)}. Raises ValueError when the two reports share no (subject, seed).
    """
    theirs = {(r["concept"], r.get("seed", 0)): r["subject_fidelity"] for r in baseline["records"]}
    differences: dict[str, list[float]] = {}
    for r in report["records"]:
        key = (r["concept"], r.get("seed", 0))
        if key in theirs:
            differences.setdefault(r["concept"], []).append(r["subject_fidelity"] - theirs[key])
    if not differences:
        raise ValueError("the two probes share no subject and seed: nothing to pair")
    per_subject = [statistics.fmean(values) for values in differences.values()]
    return {"pairs": sum(len(v) for v in differences.values()),
            "mean": statistics.fmean([d for values in differences.values() for d in values]),
            "standard_error": standard_error(per_subject)}


def markdown(report: dict) -> str:
    lines = ["| subject | seed | subject fidelity | small / large | own captions (fit) | class-word prior | "
             "through the VAE (ceiling) | prompt fidelity | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["records"]:
        sizes = r["subject_fidelity_by_size"]
        by_size = " / ".join(f"{sizes[size]:.3f}" if size in sizes else "–" for size in ("small", "large"))
        lines.append(f"| {r['concept']} | {r.get('seed', 0)} | {r['subject_fidelity']:.3f} | {by_size} | "
                     f"{r['fit_subject_fidelity']:.3f} | {r['prior_subject_fidelity']:.3f} | {r['vae_ceiling']:.3f} | "
                     f"{r['prompt_fidelity']:.3f} | {r['train_seconds']:.0f} |")
    m = report["mean"]
    error = report.get("standard_error")
    spread = f" ± {error:.3f}" if error is not None else ""
    lines.append(f"| **mean** | | **{m['subject_fidelity']:.3f}**{spread} | | {m['fit_subject_fidelity']:.3f} | "
                 f"{m['prior_subject_fidelity']:.3f} | "
                 f"{m['vae_ceiling']:.3f} | **{m['prompt_fidelity']:.3f}** | |")
    lines.append("")
    settings = report["settings"]
    subjects = len(report.get("subject_fidelity_by_subject") or {r["concept"] for r in report["records"]})
    lines.append(f"Mean over {subjects} subject(s) x {settings.get('seeds', 1)} seed(s)"
                 + (" ± the standard error over the subjects' means." if error is not None else "."))
    if "compared_with" in report:
        c = report["compared_with"]
        if c["standard_error"] is not None:
            error, basis = f" ± {c['standard_error']:.3f}", "; standard error over the subjects' mean differences"
        else:
            error, basis = "", "; one subject: no standard error"
        lines.append(f"Against {c['path']}: subject fidelity {c['mean']:+.3f}{error} (paired over the {c['pairs']} "
                     f"subject x seed run(s) both probed{basis}).")
    known = {field: settings[field] for field in ProbeSettings.__dataclass_fields__ if field in settings}
    reasons = ProbeSettings(**known).diagnostics()
    steps = settings["steps"]
    if reasons:
        lines.append(f"Diagnostic run, {steps} step(s): {'; '.join(reasons)}. Not the bar, which trains the "
                     "paper's K/V + token row with the plain masked denoising loss.")
    else:
        verdict = "meets" if report["fair"] else "does NOT meet"
        lines.append(f"The world {verdict} the bar: mean subject fidelity ≥ {SUBJECT_BAR:.2f} at prompt fidelity "
                     f"≥ {PROMPT_BAR:.2f} (teacher alone, K/V + token row, {steps} steps).")
    return "\n".join(lines) + "\n"
