"""`echodistill bench quality`: what each part of EchoDistill buys, against student-only baselines.

    echodistill bench quality --steps 200 --seeds 0 1 --out runs/quality

On the mini world's held-out concepts (echodistill.miniworld; fresh procedural subjects too, as
"procedural_<seed>", which no model or oracle of the world saw), for every concept x seed, each
method trains with the same step budget on the concept's five references (captioned in the world's
grammar), at its published learning rates times the factor `bench lr-sweep` chose for its family
(TUNED_LR_SCALES); its images for the concept's evaluation prompts (student: 1 step; teacher: 25
DDIM steps, CFG 7.5) are scored by the oracle: subject fidelity (is it the concept?) and prompt
fidelity (is it where, how large and on what the prompt says?). The table reports mean ± std over
concepts x seeds and training time, and every row paired against EchoDistill unit by unit.

Rows (METHODS): EchoDistill and its ablations (no echo, no adversarial loss, no shared text
encoder, sequential teacher-then-student) train with `Trainer`; the student-only baselines
(Custom Diffusion, Textual Inversion, DreamBooth-LoRA) with `baselines.StudentBaseline`; the
teacher row samples the teacher side of the full EchoDistill run (its training time is that
run's). Every concept is sampled through `sampling.with_concept.sample`, as a user's would. Untrained reference rows show
the floor: the class-word prior (the student given the prompts without the token; the teacher's too
when the teacher row is asked for) and the student with the token at its starting row. The
zero-training row (`image_prompt`) trains nothing: the student, with an IP-Adapter-style adapter
trained once on other subjects (miniworld/image_prompt.py), reads the unit's references as an image
prompt, from the same noise; its training time is 0 and it is paired against EchoDistill like the others.

Outputs in --out: quality.json (settings, every run's scores, the summary; rewritten after each
concept x seed, so --resume continues a stopped run), quality.md (the tables and the exact
command), sheets/<concept>-seed<k>.png (references, then one row per method, first image per prompt).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..imaging import labelled_rows, save_png
from ..miniworld.concepts import CONCEPTS, reference_images
from ..miniworld.image_prompt import ImagePromptAdapter
from ..miniworld.procedural import lookup_subject
from ..miniworld.recipe import (
    EVAL_IMAGES_PER_PROMPT,
    RESOLUTION,
    TOKEN,
    TOKEN_LR_FAMILIES,
    TUNED_LR_SCALES,
    TUNED_TOKEN_LRS,
    caption_states,
)
from ..miniworld.scoring import (
    IMAGE_PROMPT,
    TEACHER_GUIDANCE,
    TEACHER_STEPS,
    UnitInputs,
    score_image_prompt,
    score_prior,
)
from ..models.pristine import pristine
from ..models.tensor_files import atomic_write_text
from ..training.config import TrainConfig
from ..training.trainer import Trainer
from .baselines import StudentBaseline
from .measuring import BenchError
from .names import held_out_subjects
from .methods import LR_FAMILIES, METHODS, lr_family, method_config, prior_rows, rows_served, training_runs
from .quality_report import markdown, read_report, summarize


def train_method(pair, name: str, config: TrainConfig, images) -> tuple[Any, float]:
    """(ConceptBundle, wall seconds) of one training run; the pair is handed back unchanged."""
    method = METHODS[name]
    with torch.inference_mode(False), torch.enable_grad(), pristine(pair):
        started = time.perf_counter()
        if method.baseline:
            bundle = StudentBaseline(pair, images, config, method.baseline).train()
        else:
            bundle = Trainer(pair, images, config).train()
        return bundle, time.perf_counter() - started


# --- one concept x seed ----------------------------------------------------------------------------

def score_priors(pair, oracle, unit: UnitInputs, rows: Sequence[str]) -> tuple[list[dict], dict]:
    records, images = [], {}
    for row in rows:
        record, images[row] = score_prior(pair, oracle, unit, row)
        records.append(record)
    return records, images


def train_and_score(pair, oracle, unit: UnitInputs, run: str, rows: Sequence[str], *, steps: int,
                    lr_scale: float = 1.0, token_lr: float = 0.0, bundle_path: Path | None = None,
                    log: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """Train one method and score the `rows` it serves (itself and/or the teacher row): (records, {row: images}).

    `lr_scale` multiplies the method's published rates; `token_lr` > 0 trains its token row at that rate."""
    config = method_config(run, unit.concept.class_word, steps, unit.seed, lr_scale, token_lr)
    bundle, seconds = train_method(pair, run, config, unit.images)
    if bundle_path is not None:
        bundle.save(bundle_path)
    records, images = [], {}
    for row in rows:
        options = {"steps": TEACHER_STEPS, "guidance": TEACHER_GUIDANCE} if METHODS[row].part == "teacher" else {}
        generated = unit.sample(pair, concept=bundle, part=METHODS[row].part, **options)
        scores = unit.score(oracle, generated)
        records.append({"concept": unit.concept.name, "seed": unit.seed, "method": row, **scores,
                        "train_seconds": seconds, "seconds_per_step": seconds / steps, "trained_as": run,
                        "lr_scale": lr_scale, "token_lr": token_lr})
        images[row] = generated
        log(f"{unit.concept.name} seed {unit.seed}: {row:<18} trained {seconds:7.1f} s ({seconds / steps:.3f} s/step)"
            f"  lr x{lr_scale:g}{f'  token lr {token_lr:g}' if token_lr else ''}"
            f"  subject {scores['subject_fidelity']:.3f}  prompt {scores['prompt_fidelity']:.3f}")
    return records, images


def evaluate_unit(pair, oracle, concept, seed: int, *, steps: int, methods: Sequence[str], images_per_prompt: int,
                  lr_scales: dict[str, float] | None = None, token_lrs: dict[str, float] | None = None,
                  captions: bool = True, bundle_dir: Path | None = None, image_prompt: ImagePromptAdapter | None = None,
                  log: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """Train every method on one concept with one seed and score it: (records, {row: images})."""
    lr_scales, token_lrs = lr_scales or {}, token_lrs or {}
    unit = UnitInputs.build(concept, seed, images_per_prompt, captions=captions)
    records, rows = score_priors(pair, oracle, unit, prior_rows(methods))
    if IMAGE_PROMPT in methods:
        record, rows[IMAGE_PROMPT] = score_image_prompt(pair, oracle, unit, image_prompt)
        records.append(record)
        log(f"{concept.name} seed {seed}: {IMAGE_PROMPT:<18} no training  subject {record['subject_fidelity']:.3f}"
            f"  prompt {record['prompt_fidelity']:.3f}")
    for run in training_runs(methods):
        served = rows_served(run, methods)
        bundle_path = bundle_dir / f"{concept.name}-seed{seed}-{run}.safetensors" if bundle_dir else None
        run_records, run_rows = train_and_score(pair, oracle, unit, run, served, steps=steps,
                                                lr_scale=lr_scales.get(lr_family(run), 1.0),
                                                token_lr=token_lrs.get(lr_family(run), 0.0),
                                                bundle_path=bundle_path, log=log)
        records += run_records
        rows.update(run_rows)
    return records, rows


# --- the whole table -------------------------------------------------------------------------------

def run_quality(pair, oracle, *, concepts: Sequence[str], seeds: Sequence[int], steps: int, methods: Sequence[str],
                images_per_prompt: int = EVAL_IMAGES_PER_PROMPT, lr_scales: dict[str, float] | None = None,
                token_lrs: dict[str, float] | None = None, captions: bool = True,
                out: str | Path | None = None, settings: dict | None = None, resume: bool = False,
                image_prompt: ImagePromptAdapter | None = None, log: Callable[[str], None] = print) -> dict:
    """Train, sample and score every method on every concept x seed; write the report as it grows.

    `lr_scales` ({family: factor}, see LR_FAMILIES; TUNED_LR_SCALES where not given) multiplies each
    family's published learning rates; `token_lrs` ({family: rate}, see TOKEN_LR_FAMILIES; TUNED_TOKEN_LRS where
    not given) the rate of its token row (0: its adapters' rate);
    `captions` trains on the references' grammar captions (False: on the prompt templates);
    `image_prompt`: the adapter the `image_prompt` row samples with (required for that row).
    `concepts`: held-out concept names or fresh procedural subjects (names.held_out_subjects).
    Raises BenchError for unknown methods or concepts (or a procedural seed the world trained on), bad seeds
    or factors, or the image_prompt row without its adapter; ImagePromptError when the adapter does not fit the student; ConfigError
    for a config a method cannot train with. All of these before anything trains.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise BenchError(f"methods {list(methods)}: give one or more of {', '.join(METHODS)}")
    if not concepts:
        raise BenchError(f"no concepts: give one or more of {', '.join(sorted(CONCEPTS))} or procedural_<seed>")
    concepts = held_out_subjects(concepts)
    subjects = {name: lookup_subject(name) for name in concepts}
    if not seeds or min(seeds) < 0 or images_per_prompt < 1:
        raise BenchError(f"seeds {list(seeds)}, images per prompt {images_per_prompt}: need seeds >= 0, images >= 1")
    lr_scales = {**TUNED_LR_SCALES, **(lr_scales or {})}
    if set(lr_scales) != set(LR_FAMILIES) or not all(factor > 0 for factor in lr_scales.values()):
        raise BenchError(f"learning-rate scales {lr_scales}: give factors > 0 for {', '.join(LR_FAMILIES)}")
    token_lrs = {**TUNED_TOKEN_LRS, **(token_lrs or {})}
    if set(token_lrs) != set(TOKEN_LR_FAMILIES) or not all(rate >= 0 for rate in token_lrs.values()):
        raise BenchError(f"token-row rates {token_lrs}: give rates >= 0 for {', '.join(TOKEN_LR_FAMILIES)}")
    for run in training_runs(methods):  # a bad config fails now, not hours into the run
        method_config(run, subjects[concepts[0]].class_word, steps, 0, lr_scales[lr_family(run)],
                      token_lrs.get(lr_family(run), 0.0))
    if IMAGE_PROMPT in methods:
        if image_prompt is None:
            raise BenchError(f"the {IMAGE_PROMPT} row needs the image-prompt adapter (ImagePromptAdapter.load); "
                             "pass it as image_prompt, or leave the row out of methods")
        with image_prompt.attached(pair.student.unet):  # an adapter made for another UNet fails now
            pass

    settings = {**(settings or {}), "concepts": list(concepts), "seeds": list(seeds), "steps": steps,
                "methods": list(methods), "images_per_prompt": images_per_prompt, "lr_scales": lr_scales,
                "token_lrs": token_lrs, "captions": captions, "caption_states": caption_states(captions),
                "resolution": RESOLUTION,
                "token": TOKEN, "student_steps": 1, "teacher_steps": TEACHER_STEPS,
                "teacher_guidance": TEACHER_GUIDANCE, "fingerprints": pair.fingerprints()}
    out = Path(out) if out else None
    report_path = out / "quality.json" if out else None
    records: list[dict] = []
    if resume and report_path and report_path.is_file():
        previous = read_report(report_path, "give another --out, or --overwrite to start it anew")
        comparable = {k: v for k, v in settings.items() if k not in ("command", "concepts", "seeds", "threads")}
        # reports from before the token row had its own rate trained it at its adapters' rate: 0 in today's terms
        written = {"token_lrs": dict.fromkeys(TOKEN_LR_FAMILIES, 0.0), **previous["settings"]}
        differing = [k for k, v in comparable.items() if written.get(k) != v]
        if differing:
            raise BenchError(f"--resume: {report_path} was written with other settings ({', '.join(differing)}); "
                             "use another --out")
        records = previous["records"]

    def report() -> dict:
        return {"benchmark": "quality", "settings": settings, "records": records,
                "summary": summarize(records, methods)}

    priors = prior_rows(methods)
    for name in concepts:
        for seed in seeds:
            done = {r["method"] for r in records if r["concept"] == name and r["seed"] == seed}
            if set(methods) <= done:
                missing = [row for row in priors if row not in done]  # e.g. a row added since: no training
                if missing:
                    unit = UnitInputs.build(subjects[name], seed, images_per_prompt, captions=captions)
                    records += score_priors(pair, oracle, unit, missing)[0]
                    log(f"{name} seed {seed}: trained rows already in {report_path}; scored {', '.join(missing)}")
                    if out:
                        atomic_write_text(report_path, json.dumps(report(), indent=2) + "\n")
                else:
                    log(f"{name} seed {seed}: already in {report_path}, skipped")
                continue
            records = [r for r in records if not (r["concept"] == name and r["seed"] == seed)]
            unit, rows = evaluate_unit(pair, oracle, subjects[name], seed, steps=steps, methods=methods,
                                       images_per_prompt=images_per_prompt, lr_scales=lr_scales, token_lrs=token_lrs,
                                       captions=captions,
                                       bundle_dir=out / "bundles" if out else None, image_prompt=image_prompt,
                                       log=log)
            records += unit
            if out:
                _save_sheet(out / "sheets" / f"{name}-seed{seed}.png", subjects[name], rows, images_per_prompt)
                atomic_write_text(report_path, json.dumps(report(), indent=2) + "\n")
    final = report()
    if out:
        atomic_write_text(out / "quality.md", markdown(final) + "\n")
    return final


def _save_sheet(path: Path, concept, rows: dict[str, torch.Tensor], images_per_prompt: int) -> None:
    """References, then one labelled row per method: the first image of each prompt."""
    references = torch.from_numpy(reference_images(concept)).permute(0, 3, 1, 2).float() / 255.0
    sheet = labelled_rows([("references", references),
                           *((name, images[::images_per_prompt]) for name, images in rows.items())])
    save_png(sheet, path, {"echodistill": json.dumps({"concept": concept.name, "rows": list(rows)})})
