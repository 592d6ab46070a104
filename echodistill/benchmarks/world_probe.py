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
With `trainable="unet"` every UNet weight trains instead of the K/V deltas (a diagnostic, not the bar).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..imaging import labelled_rows, save_png
from ..miniworld.concepts import Concept, reference_captions
from ..miniworld.evaluate import vae_round_trip_fidelity
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
from .probe_settings import PROMPT_BAR, SUBJECT_BAR, ProbeSettings


def probe_subject(pair: ModelPair, oracle: Oracle, concept: Concept, settings: ProbeSettings,
                  log: Callable[[str], None] = print) -> tuple[dict, dict[str, torch.Tensor]]:
    """Train the teacher's K/V + token row on `concept` inside a borrow of `pair`; score its 25-step pictures.

    Returns the record (subject and prompt fidelity, fit, seconds) and the sheet's rows: {label: (N, 3, 64, 64)
    pictures in [0, 1]}.
    """
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
            encoder_hidden_states = encode_prompts(borrowed.tokenizer, borrowed.text_encoder, batch.prompts)
            noise = torch.randn(latents.shape, generator=draws)
            timesteps = torch.randint(0, len(alphas_cumprod), (settings.batch,), generator=draws)
            prediction = unet_call(unet, add_noise(latents, noise, timesteps, alphas_cumprod), timesteps,
                                   encoder_hidden_states)
            target = denoising_target(latents, noise, timesteps, alphas_cumprod, borrowed.teacher.prediction_type)
            loss = masked_denoising_loss(prediction, target, batch.mask).mean()
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
    record = {"concept": concept.name, **unit.score(oracle, images), "train_seconds": round(seconds, 1),
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


def run_world_probe(pair: ModelPair, oracle: Oracle, concepts: Sequence[Concept], settings: ProbeSettings,
                    out: str | Path, extra: dict | None = None, log: Callable[[str], None] = print) -> dict:
    """Probe every concept; write world_probe.json, world_probe.md and one sheet per concept into `out`."""
    out = Path(out)
    make_folder(out / "sheets")  # the command line removes it again if the probe fails or is stopped
    records = []
    for concept in concepts:
        record, rows = probe_subject(pair, oracle, concept, settings, log)
        records.append(record)
        log(f"{concept.name}: subject fidelity {record['subject_fidelity']:.3f} (prior "
            f"{record['prior_subject_fidelity']:.3f}), prompt fidelity {record['prompt_fidelity']:.3f}, "
            f"own captions {record['fit_subject_fidelity']:.3f}")
        save_png(labelled_rows(list(rows.items())), out / "sheets" / f"{concept.name}.png", {"concept": concept.name})
    mean = {key: sum(r[key] for r in records) / len(records)
            for key in ("subject_fidelity", "prompt_fidelity", "fit_subject_fidelity", "prior_subject_fidelity",
                        "prior_prompt_fidelity", "vae_ceiling")}
    report = {
        "settings": {**asdict(settings), **(extra or {})},
        "records": records,
        "mean": mean,
        "bar": {"subject_fidelity": SUBJECT_BAR, "prompt_fidelity": PROMPT_BAR},
        # only the paper's adapter can pass: the whole-UNet run is a diagnostic
        "fair": (settings.trainable == "adapter" and mean["subject_fidelity"] >= SUBJECT_BAR
                 and mean["prompt_fidelity"] >= PROMPT_BAR),
    }
    atomic_write_text(out / "world_probe.json", json.dumps(report, indent=2))
    atomic_write_text(out / "world_probe.md", markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = ["| subject | subject fidelity | small / large | own captions (fit) | class-word prior | "
             "through the VAE (ceiling) | prompt fidelity | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["records"]:
        sizes = r["subject_fidelity_by_size"]
        by_size = " / ".join(f"{sizes[size]:.3f}" if size in sizes else "–" for size in ("small", "large"))
        lines.append(f"| {r['concept']} | {r['subject_fidelity']:.3f} | {by_size} | {r['fit_subject_fidelity']:.3f} | "
                     f"{r['prior_subject_fidelity']:.3f} | {r['vae_ceiling']:.3f} | {r['prompt_fidelity']:.3f} | "
                     f"{r['train_seconds']:.0f} |")
    m = report["mean"]
    lines.append(f"| **mean** | **{m['subject_fidelity']:.3f}** | | {m['fit_subject_fidelity']:.3f} | "
                 f"{m['prior_subject_fidelity']:.3f} | "
                 f"{m['vae_ceiling']:.3f} | **{m['prompt_fidelity']:.3f}** | |")
    lines.append("")
    steps = report["settings"]["steps"]
    if report["settings"].get("trainable", "adapter") == "unet":
        lines.append(f"Diagnostic run: every UNet weight + the token row trained ({steps} steps), not the bar, "
                     "which trains the paper's K/V + token row.")
    else:
        verdict = "meets" if report["fair"] else "does NOT meet"
        lines.append(f"The world {verdict} the bar: mean subject fidelity ≥ {SUBJECT_BAR:.2f} at prompt fidelity "
                     f"≥ {PROMPT_BAR:.2f} (teacher alone, K/V + token row, {steps} steps).")
    return "\n".join(lines) + "\n"
