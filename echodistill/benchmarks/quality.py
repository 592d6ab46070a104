"""`echodistill bench quality`: what each part of EchoDistill buys, against student-only baselines.

    echodistill bench quality --steps 200 --seeds 0 1 --out runs/quality

On the mini world's held-out concepts (echodistill.miniworld), for every concept x seed, each
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
run's). Every concept goes through `jobs.sample`, as a user's would. Untrained reference rows show
the floor: the class-word prior (the student given the prompts without the token; the teacher's too
when the teacher row is asked for) and the student with the token at its starting row.

Outputs in --out: quality.json (settings, every run's scores, the summary; rewritten after each
concept x seed, so --resume continues a stopped run), quality.md (the tables and the exact
command), sheets/<concept>-seed<k>.png (references, then one row per method, first image per prompt).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..models.tensor_files import atomic_write_text
from ..training.config import TrainConfig, preset
from .measuring import BenchError

TOKEN = "<v*>"
RESOLUTION = 64  # the mini world's image size
TEACHER_STEPS, TEACHER_GUIDANCE = 25, 7.5
PRIOR = "class_prior"
TEACHER_PRIOR = "class_prior_teacher"  # shown when the teacher row is: what the teacher drew before training
START_PRIOR = "token_at_start"  # the untrained student with the token at its starting row: where training begins


@dataclass(frozen=True)
class Method:
    label: str
    changes: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides of the full method
    baseline: str | None = None  # a baselines.BASELINES name: student-only training
    part: str = "student"  # which side of the trained concept is sampled


METHODS: dict[str, Method] = {
    "echodistill": Method("EchoDistill (full), student 1 step"),
    "no_echo": Method("w/o echo", {"echo": False}),
    "no_adversarial": Method("w/o adversarial", {"weight_adversarial": 0.0}),
    "no_shared_encoder": Method("w/o shared text encoder", {"shared_text_encoder": False}),
    "sequential": Method("sequential: teacher, then distill", {"schedule": "sequential", "echo": False}),
    "custom_diffusion": Method("Custom Diffusion K/V on the student", baseline="custom_diffusion"),
    "textual_inversion": Method("Textual Inversion on the student", baseline="textual_inversion"),
    "dreambooth_lora": Method("DreamBooth-LoRA on the student", baseline="dreambooth_lora"),
    "teacher": Method(f"EchoDistill teacher, {TEACHER_STEPS} DDIM steps", part="teacher"),
}
PRIOR_LABEL = "class-word prior (untrained student, token removed)"
PRIOR_LABELS = {PRIOR: PRIOR_LABEL,
                START_PRIOR: "untrained student, token at its starting row (the class word's)",
                TEACHER_PRIOR: f"class-word prior of the teacher ({TEACHER_STEPS} steps, untrained, token removed)"}


def prior_rows(methods: Sequence[str]) -> list[str]:
    """The untrained reference rows a table of `methods` shows."""
    return [PRIOR, START_PRIOR, *([TEACHER_PRIOR] if "teacher" in methods else [])]


def echodistill_config(class_word: str, steps: int, seed: int, **changes) -> TrainConfig:
    """The paper preset at the mini world's size, echo rounds scaled to the step budget (as the demo)."""
    return preset("paper", steps=steps, resolution=RESOLUTION, token=TOKEN, class_word=class_word, seed=seed,
                  echo_start=max(1, steps // 2), echo_every=max(1, steps // 4), echo_samples=8,
                  sample_every=0, save_every=0, **changes)


# Learning rates are tuned per family: the ablations and the teacher row keep the full method's rates
# (an ablation removes a part, not a setting), each baseline has its own.
LR_FAMILIES = ("echodistill", "custom_diffusion", "textual_inversion", "dreambooth_lora")
# Factors of the published rates chosen for the mini world at 100 steps by `echodistill bench lr-sweep
# --concept smiley --seed 100` (docs/quality.md); the defaults of `bench quality` and the demo.
TUNED_LR_SCALES: dict[str, float] = {"echodistill": 3.0, "custom_diffusion": 0.3, "textual_inversion": 10.0,
                                     "dreambooth_lora": 3.0}


def lr_family(name: str) -> str:
    return METHODS[name].baseline or "echodistill"


def parse_lr_scales(specs: Sequence[str]) -> dict[str, float]:
    """`FAMILY=FACTOR` strings -> {family: factor} for every family (TUNED_LR_SCALES where not given)."""
    scales = dict(TUNED_LR_SCALES)
    for spec in specs:
        family, _, factor = spec.partition("=")
        try:
            value = float(factor)
        except ValueError:
            value = float("nan")
        if family not in LR_FAMILIES or not value > 0:
            raise BenchError(f"--lr-scale {spec!r}: write FAMILY=FACTOR with a factor > 0 and FAMILY one of "
                             f"{', '.join(LR_FAMILIES)}")
        scales[family] = value
    return scales


def method_config(name: str, class_word: str, steps: int, seed: int, lr_scale: float = 1.0) -> TrainConfig:
    """A method's config; `lr_scale` multiplies the rates of what it personalizes (adapters, token rows)."""
    from .baselines import baseline_config

    method = METHODS[name]
    if method.baseline:
        config = baseline_config(method.baseline, steps=steps, resolution=RESOLUTION, token=TOKEN,
                                 class_word=class_word, seed=seed)
        return config.with_changes(lr_student=config.lr_student * lr_scale)
    config = echodistill_config(class_word, steps, seed, **method.changes)
    # The discriminator heads start from scratch at every size: their rate is not scaled.
    return config.with_changes(lr_student=config.lr_student * lr_scale, lr_teacher=config.lr_teacher * lr_scale)


def _training_runs(methods: Sequence[str]) -> list[str]:
    """The trainings the rows need: the teacher row is the teacher side of the full run."""
    runs = [m for m in methods if m != "teacher"]
    if "teacher" in methods and "echodistill" not in runs:
        runs.insert(0, "echodistill")
    return runs


def train_method(pair, name: str, config: TrainConfig, images) -> tuple[Any, float]:
    """(ConceptBundle, wall seconds) of one training run; the pair is handed back unchanged."""
    from ..models.pristine import pristine
    from ..training.trainer import Trainer
    from .baselines import StudentBaseline

    method = METHODS[name]
    with torch.inference_mode(False), torch.enable_grad(), pristine(pair):
        started = time.perf_counter()
        if method.baseline:
            bundle = StudentBaseline(pair, images, config, method.baseline).train()
        else:
            bundle = Trainer(pair, images, config).train()
        return bundle, time.perf_counter() - started


# --- one concept x seed ----------------------------------------------------------------------------

def training_references(concept, captions: bool = True, rendered=None) -> list:
    """A concept's references as training images, captioned in the world's grammar unless `captions` is False.

    The mini world's text encoder learned the grammar ("a {} on a plain red background"); a template
    ("a photo of a {}") is a context it saw in only a fifth of its captions, and what a concept learns
    there carries over less to the grammar's evaluation prompts. `rendered`: the references already drawn.
    """
    import dataclasses

    from PIL import Image

    from ..miniworld import reference_captions, reference_images
    from ..training.photos import load_concept_images

    rendered = reference_images(concept) if rendered is None else rendered  # (5, 64, 64, 3) uint8
    images = load_concept_images([Image.fromarray(a) for a in rendered], resolution=RESOLUTION)
    if not captions:
        return images
    return [dataclasses.replace(image, caption=caption)
            for image, caption in zip(images, reference_captions(concept), strict=True)]


@dataclass
class UnitInputs:
    """What every method of one concept x seed trains on and is scored against."""

    concept: Any
    seed: int
    images: list  # the references as training images
    reference_pixels: torch.Tensor  # (5, 3, 64, 64) in [0, 1]
    texts: list[str]  # evaluation prompts with the token, each repeated images-per-prompt times
    stated: list[dict]  # the attributes each prompt states
    noise_seeds: list[int]  # the same noise for every method: rows differ by training alone

    @classmethod
    def build(cls, concept, seed: int, images_per_prompt: int, captions: bool = False) -> UnitInputs:
        """`captions`: train on each reference's caption in the world's grammar instead of the templates."""
        from ..miniworld import evaluation_prompts, reference_images

        references = reference_images(concept)  # (5, 64, 64, 3) uint8
        prompts = evaluation_prompts(concept)
        return cls(
            concept=concept, seed=seed, images=training_references(concept, captions, rendered=references),
            reference_pixels=torch.from_numpy(references).permute(0, 3, 1, 2).float() / 255.0,
            texts=[p.text.format(token=TOKEN) for p in prompts for _ in range(images_per_prompt)],
            stated=[p.stated for p in prompts for _ in range(images_per_prompt)],
            noise_seeds=[seed * 100_000 + i for i in range(len(prompts) * images_per_prompt)],
        )

    def sample(self, pair, texts: list[str] | None = None, **options) -> torch.Tensor:
        from ..jobs.runs import sample

        return sample(pair, texts or self.texts, seeds=self.noise_seeds, width=RESOLUTION, height=RESOLUTION,
                      return_latents=False, **options).images  # (N, 3, 64, 64)

    def score(self, oracle, images: torch.Tensor) -> dict[str, float]:
        return {"subject_fidelity": float(oracle.subject_fidelity(images, self.reference_pixels)),
                "prompt_fidelity": float(oracle.prompt_fidelity(images, self.stated).mean())}


def score_prior(pair, oracle, unit: UnitInputs, row: str = PRIOR) -> tuple[dict, torch.Tensor]:
    """A class-word prior: the untrained student (or teacher) given the prompts without the token.

    START_PRIOR keeps the token at the row every method but DreamBooth-LoRA starts from, the class
    word's (its initializer): the same prompt embeddings as writing the class word in its place.
    """
    word = unit.concept.class_word if row == START_PRIOR else ""
    prior_texts = [" ".join(text.replace(TOKEN, word).split()) for text in unit.texts]
    if row == TEACHER_PRIOR:
        images = unit.sample(pair, prior_texts, part="teacher", steps=TEACHER_STEPS, guidance=TEACHER_GUIDANCE)
    else:
        images = unit.sample(pair, prior_texts, part="student")
    record = {"concept": unit.concept.name, "seed": unit.seed, "method": row, **unit.score(oracle, images),
              "train_seconds": None, "seconds_per_step": None}
    return record, images


def score_priors(pair, oracle, unit: UnitInputs, rows: Sequence[str]) -> tuple[list[dict], dict]:
    records, images = [], {}
    for row in rows:
        record, images[row] = score_prior(pair, oracle, unit, row)
        records.append(record)
    return records, images


def train_and_score(pair, oracle, unit: UnitInputs, run: str, rows: Sequence[str], *, steps: int,
                    lr_scale: float = 1.0, bundle_path: Path | None = None,
                    log: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """Train one method and score the `rows` it serves (itself and/or the teacher row): (records, {row: images})."""
    config = method_config(run, unit.concept.class_word, steps, unit.seed, lr_scale)
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
                        "lr_scale": lr_scale})
        images[row] = generated
        log(f"{unit.concept.name} seed {unit.seed}: {row:<18} trained {seconds:7.1f} s ({seconds / steps:.3f} s/step)"
            f"  lr x{lr_scale:g}  subject {scores['subject_fidelity']:.3f}  prompt {scores['prompt_fidelity']:.3f}")
    return records, images


def evaluate_unit(pair, oracle, concept, seed: int, *, steps: int, methods: Sequence[str], images_per_prompt: int,
                  lr_scales: dict[str, float] | None = None, captions: bool = True, bundle_dir: Path | None = None,
                  log: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """Train every method on one concept with one seed and score it: (records, {row: images})."""
    lr_scales = lr_scales or {}
    unit = UnitInputs.build(concept, seed, images_per_prompt, captions=captions)
    records, rows = score_priors(pair, oracle, unit, prior_rows(methods))
    for run in _training_runs(methods):
        served = [run] if run in methods else []
        if run == "echodistill" and "teacher" in methods:
            served.append("teacher")
        bundle_path = bundle_dir / f"{concept.name}-seed{seed}-{run}.safetensors" if bundle_dir else None
        run_records, run_rows = train_and_score(pair, oracle, unit, run, served, steps=steps,
                                                lr_scale=lr_scales.get(lr_family(run), 1.0),
                                                bundle_path=bundle_path, log=log)
        records += run_records
        rows.update(run_rows)
    return records, rows


# --- the whole table -------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


REFERENCE_METHOD = "echodistill"  # the row every other row is paired against


def _mean_se(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "se": None}
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "se": se}


def paired_against_reference(records: list[dict], name: str) -> dict | None:
    """EchoDistill (full) minus `name`, unit by unit (same concept, seed and sampling noise).

    Concepts differ far more from each other than methods do, so the mean ± std columns hide
    small but consistent differences; pairing by concept x seed removes that spread. None when
    there is no reference row or `name` is the reference.
    """
    if name == REFERENCE_METHOD:
        return None
    scores = {(r["concept"], r["seed"], r["method"]): r for r in records}
    units = sorted({(c, seed) for c, seed, m in scores if m == name}
                   & {(c, seed) for c, seed, m in scores if m == REFERENCE_METHOD})
    if not units:
        return None
    deltas = {key: [scores[(*u, REFERENCE_METHOD)][key] - scores[(*u, name)][key] for u in units]
              for key in ("subject_fidelity", "prompt_fidelity")}
    return {"units": len(units), "subject_fidelity": _mean_se(deltas["subject_fidelity"]),
            "prompt_fidelity": _mean_se(deltas["prompt_fidelity"]),
            "reference_wins_subject": sum(d > 0 for d in deltas["subject_fidelity"])}


def summarize(records: list[dict], methods: Sequence[str]) -> list[dict]:
    """One row per method (the priors first): mean ± std over concepts x seeds, per concept, and paired
    against EchoDistill (full)."""
    summary = []
    for name in [*prior_rows(methods), *methods]:
        runs = [r for r in records if r["method"] == name]
        if not runs and name in PRIOR_LABELS:  # a report written before this prior row existed
            continue
        timed = [r for r in runs if r["train_seconds"] is not None]
        concepts = sorted({r["concept"] for r in runs})
        summary.append({
            "method": name,
            "label": PRIOR_LABELS[name] if name in PRIOR_LABELS else METHODS[name].label,
            "runs": len(runs),
            "subject_fidelity": _mean_std([r["subject_fidelity"] for r in runs]),
            "prompt_fidelity": _mean_std([r["prompt_fidelity"] for r in runs]),
            "train_seconds": _mean_std([r["train_seconds"] for r in timed]),
            "seconds_per_step": _mean_std([r["seconds_per_step"] for r in timed]),
            "subject_fidelity_per_concept": {
                c: statistics.fmean(r["subject_fidelity"] for r in runs if r["concept"] == c) for c in concepts
            },
            "reference_minus_this": paired_against_reference(records, name),
        })
    return summary


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def run_quality(pair, oracle, *, concepts: Sequence[str], seeds: Sequence[int], steps: int, methods: Sequence[str],
                images_per_prompt: int = 4, lr_scales: dict[str, float] | None = None, captions: bool = True,
                out: str | Path | None = None, settings: dict | None = None, resume: bool = False,
                log: Callable[[str], None] = print) -> dict:
    """Train, sample and score every method on every concept x seed; write the report as it grows.

    `lr_scales` ({family: factor}, see LR_FAMILIES; TUNED_LR_SCALES where not given) multiplies each
    family's published learning rates;
    `captions` trains on the references' grammar captions (False: on the prompt templates).
    """
    from ..miniworld import CONCEPTS

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise BenchError(f"methods {list(methods)}: give one or more of {', '.join(METHODS)}")
    missing = [c for c in concepts if c not in CONCEPTS]
    if missing or not concepts:
        raise BenchError(f"concepts {list(concepts)}: give one or more of {', '.join(sorted(CONCEPTS))}")
    if not seeds or min(seeds) < 0 or images_per_prompt < 1:
        raise BenchError(f"seeds {list(seeds)}, images per prompt {images_per_prompt}: need seeds >= 0, images >= 1")
    lr_scales = {**TUNED_LR_SCALES, **(lr_scales or {})}
    if set(lr_scales) != set(LR_FAMILIES) or not all(factor > 0 for factor in lr_scales.values()):
        raise BenchError(f"learning-rate scales {lr_scales}: give factors > 0 for {', '.join(LR_FAMILIES)}")
    for run in _training_runs(methods):  # a bad config fails now, not hours into the run
        method_config(run, CONCEPTS[concepts[0]].class_word, steps, 0, lr_scales[lr_family(run)])

    settings = {**(settings or {}), "concepts": list(concepts), "seeds": list(seeds), "steps": steps,
                "methods": list(methods), "images_per_prompt": images_per_prompt, "lr_scales": lr_scales,
                "captions": captions, "resolution": RESOLUTION,
                "token": TOKEN, "student_steps": 1, "teacher_steps": TEACHER_STEPS,
                "teacher_guidance": TEACHER_GUIDANCE, "fingerprints": pair.fingerprints()}
    out = Path(out) if out else None
    report_path = out / "quality.json" if out else None
    records: list[dict] = []
    if resume and report_path and report_path.is_file():
        previous = json.loads(report_path.read_text())
        comparable = {k: v for k, v in settings.items() if k not in ("command", "concepts", "seeds", "threads")}
        if any(previous["settings"].get(k) != v for k, v in comparable.items()):
            raise BenchError(f"--resume: {report_path} was written with other settings; use another --out")
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
                    unit = UnitInputs.build(CONCEPTS[name], seed, images_per_prompt, captions=captions)
                    records += score_priors(pair, oracle, unit, missing)[0]
                    log(f"{name} seed {seed}: trained rows already in {report_path}; scored {', '.join(missing)}")
                    if out:
                        atomic_write_text(report_path, json.dumps(report(), indent=2) + "\n")
                else:
                    log(f"{name} seed {seed}: already in {report_path}, skipped")
                continue
            records = [r for r in records if not (r["concept"] == name and r["seed"] == seed)]
            unit, rows = evaluate_unit(pair, oracle, CONCEPTS[name], seed, steps=steps, methods=methods,
                                       images_per_prompt=images_per_prompt, lr_scales=lr_scales, captions=captions,
                                       bundle_dir=out / "bundles" if out else None, log=log)
            records += unit
            if out:
                _save_sheet(out / "sheets" / f"{name}-seed{seed}.png", CONCEPTS[name], rows, images_per_prompt)
                atomic_write_text(report_path, json.dumps(report(), indent=2) + "\n")
    final = report()
    if out:
        atomic_write_text(out / "quality.md", markdown(final) + "\n")
    return final


def merge_reports(folders: Sequence[str | Path], out: str | Path) -> dict:
    """One report from runs made side by side (e.g. one process per seed) with the same settings.

    Every run must share the settings that make numbers comparable (models, oracle, steps, methods,
    learning rates, ...); their concept x seed units must not overlap. Writes quality.json and
    quality.md into `out`; each run's sheets and bundles stay where they are.
    """
    reports = []
    for folder in folders:
        path = Path(folder) / "quality.json"
        if not path.is_file():
            raise BenchError(f"{path} does not exist: give folders written by `bench quality --out`")
        reports.append(json.loads(path.read_text()))
    if len(reports) < 2:
        raise BenchError("give two or more report folders to merge")
    private = ("command", "commands", "concepts", "seeds", "threads", "device")
    first = {k: v for k, v in reports[0]["settings"].items() if k not in private}
    for folder, report in zip(folders[1:], reports[1:], strict=True):
        other = {k: v for k, v in report["settings"].items() if k not in private}
        differing = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if differing:
            raise BenchError(f"{folder} was run with other settings ({', '.join(differing)}); only runs of "
                             "the same benchmark can be merged")
    records, seen = [], set()
    for folder, report in zip(folders, reports, strict=True):
        for record in report["records"]:
            key = (record["concept"], record["seed"], record["method"])
            if key in seen:
                raise BenchError(f"{folder} repeats {key[0]} seed {key[1]} ({key[2]}): the runs overlap")
            seen.add(key)
            records.append(record)
    concepts = list(dict.fromkeys(c for r in reports for c in r["settings"]["concepts"]))
    seeds = sorted({seed for r in reports for seed in r["settings"]["seeds"]})
    commands = [r["settings"].get("command", "run_quality(...)") for r in reports]
    devices = sorted({r["settings"].get("device") for r in reports if r["settings"].get("device")})
    settings = {**reports[0]["settings"], "concepts": concepts, "seeds": seeds, "commands": commands,
                "command": " ; ".join(commands), "device": " / ".join(devices) or None}
    methods = settings["methods"]
    merged = {"benchmark": "quality", "settings": settings, "records": records,
              "summary": summarize(records, methods)}
    out = Path(out)
    atomic_write_text(out / "quality.json", json.dumps(merged, indent=2) + "\n")
    atomic_write_text(out / "quality.md", markdown(merged) + "\n")
    return merged


def _save_sheet(path: Path, concept, rows: dict[str, torch.Tensor], images_per_prompt: int) -> None:
    """References, then one labelled row per method: the first image of each prompt."""
    from ..imaging import labelled_rows, save_png
    from ..miniworld import reference_images

    references = torch.from_numpy(reference_images(concept)).permute(0, 3, 1, 2).float() / 255.0
    sheet = labelled_rows([("references", references),
                           *((name, images[::images_per_prompt]) for name, images in rows.items())])
    save_png(sheet, path, {"echodistill": json.dumps({"concept": concept.name, "rows": list(rows)})})


# --- tables ----------------------------------------------------------------------------------------

def _pm(stats: dict, spec: str = ".3f") -> str:
    if stats["mean"] is None:
        return "–"
    return f"{stats['mean']:{spec}} ± {stats['std']:{spec}}"


def markdown(report: dict) -> str:
    s, summary = report["settings"], report["summary"]
    runs = len(s["concepts"]) * len(s["seeds"])
    lines = [
        "# Quality benchmark: EchoDistill, its ablations and student-only baselines (mini world)",
        "",
        *(["Commands (run side by side, merged with `echodistill bench quality-merge`):", "",
           *(f"- `{c}`" for c in s["commands"])] if "commands" in s
          else [f"Command: `{s.get('command', 'run_quality(...)')}`"]),
        "",
        f"- {len(s['concepts'])} concepts x {len(s['seeds'])} seeds = {runs} runs per method, {s['steps']} training "
        f"steps each; {s['images_per_prompt']} image(s) per evaluation prompt; student {s['student_steps']} step, "
        f"teacher {s['teacher_steps']} DDIM steps at CFG {s['teacher_guidance']}; {s['resolution']}x{s['resolution']}",
        f"- models: {json.dumps(s['fingerprints'], sort_keys=True)}",
    ]
    if "captions" in s:
        lines.append("- references trained " + ("with their captions in the world's grammar (\"a {} on a plain red "
                     "background\")" if s["captions"] else "with the trainer's prompt templates (\"a photo of a {}\")"))
    scaled = {family: factor for family, factor in s.get("lr_scales", {}).items() if factor != 1.0}
    if scaled:
        lines.append("- learning rates scaled from the published ones (the ablations and the teacher row follow "
                     "echodistill): " + ", ".join(f"{family} x{factor:g}" for family, factor in scaled.items()))
    if "oracle" in s:
        lines.append(f"- oracle: `{s['oracle']['path']}` ({json.dumps(s['oracle']['digests'], sort_keys=True)})")
    if s.get("device"):
        lines.append(f"- device: {s['device']}, torch {s.get('torch')}")
    lines += [
        "- mean ± std over concepts x seeds; train s is wall time of one training run (the teacher row's is the full "
        "EchoDistill run it samples); subject and prompt fidelity are the mini world's oracles, higher is better",
        "",
        "| method | subject fidelity | prompt fidelity | train s | s/step | runs |",
        "|:--|--:|--:|--:|--:|--:|",
    ]
    for row in summary:
        lines.append(f"| {row['label']} | {_pm(row['subject_fidelity'])} | {_pm(row['prompt_fidelity'])} | "
                     f"{_pm(row['train_seconds'], '.1f')} | {_pm(row['seconds_per_step'])} | {row['runs']} |")
    paired = [row for row in summary if row.get("reference_minus_this")]
    if paired:
        reference = METHODS[REFERENCE_METHOD].label
        lines += ["", f"Paired by concept x seed (same references, same sampling noise): {reference} minus each row, "
                  "mean ± standard error over the units; wins = units where EchoDistill's subject fidelity is higher:",
                  "", "| row | Δ subject fidelity | Δ prompt fidelity | EchoDistill wins |", "|:--|--:|--:|--:|"]
        for row in paired:
            d = row["reference_minus_this"]
            subject, prompt = d["subject_fidelity"], d["prompt_fidelity"]
            lines.append(f"| {row['label']} | {subject['mean']:+.4f} ± {subject['se']:.4f} | "
                         f"{prompt['mean']:+.4f} ± {prompt['se']:.4f} | {d['reference_wins_subject']}/{d['units']} |")
    concepts = s["concepts"]
    lines += ["", "Subject fidelity per concept (mean over seeds):", "",
              "| method | " + " | ".join(concepts) + " |", "|:--|" + "--:|" * len(concepts)]
    for row in summary:
        cells = [f"{row['subject_fidelity_per_concept'][c]:.3f}" if c in row["subject_fidelity_per_concept"] else "–"
                 for c in concepts]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concepts", nargs="+", help="held-out mini-world concepts (default: all six)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training and sampling seeds")
    parser.add_argument("--steps", type=int, default=200, help="training iterations of every method (equal budget)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                        help=f"rows to train and score (default: all): {', '.join(METHODS)}")
    parser.add_argument("--images-per-prompt", type=int, default=4, help="images per evaluation prompt and run")
    parser.add_argument("--lr-scale", nargs="+", default=[], metavar="FAMILY=FACTOR",
                        help="multiply a family's published learning rates (`bench lr-sweep` chooses them; "
                             "default: " + " ".join(f"{f}={x:g}" for f, x in TUNED_LR_SCALES.items()) + "; "
                             "1 for the published rates)")
    parser.add_argument("--templates", action="store_true",
                        help="train on the prompt templates instead of the references' grammar captions")
    parser.add_argument("--oracle", help="oracle weights folder (default: the shipped mini-world oracle)")
    parser.add_argument("--out", default="runs/quality", help="folder for quality.json, quality.md, sheets/, bundles/")
    parser.add_argument("--resume", action="store_true", help="keep the finished concept x seed runs in --out")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own)")


def shown_path(path: Path) -> str:
    """A path as a reader can use it elsewhere: relative to the working folder when it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def command_line(args: argparse.Namespace) -> str:
    """The exact, complete command for these settings (every default spelled out)."""
    parts = ["echodistill", "bench", "quality", "--concepts", *args.concepts, "--seeds", *map(str, args.seeds),
             "--steps", str(args.steps), "--methods", *args.methods, "--images-per-prompt",
             str(args.images_per_prompt), "--lr-scale",
             *(f"{family}={factor:g}" for family, factor in parse_lr_scales(args.lr_scale).items()),
             *(["--templates"] if args.templates else []),
             "--oracle", shown_path(args.oracle), "--out", str(args.out),
             "--device", args.device]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if args.resume:
        parts.append("--resume")
    return shlex.join(parts)


def load_world(args: argparse.Namespace) -> tuple[Any, Any, dict]:
    """The shipped mini-world pair and the oracle of `args`, and the settings that identify them."""
    from ..miniworld import ORACLE_ROOT, STUDENT_DIR, TEACHER_DIR, Oracle
    from ..miniworld.oracle import ENCODER_FILE, READER_FILE
    from ..models.pair import load_model_pair
    from .measuring import device_name

    if args.threads is not None:
        if args.threads < 1:
            raise BenchError(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    args.oracle = Path(args.oracle or ORACLE_ROOT)
    oracle = Oracle.load(args.oracle)  # before anything trains: a missing oracle fails at once
    pair = load_model_pair(TEACHER_DIR, STUDENT_DIR, device=args.device)
    settings = {
        "oracle": {"path": shown_path(args.oracle),
                   "digests": {f: _file_digest(args.oracle / f) for f in (READER_FILE, ENCODER_FILE)}},
        "device": device_name(pair.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    return pair, oracle, settings


def run_from_args(args: argparse.Namespace) -> int:
    from ..miniworld import CONCEPTS

    args.concepts = args.concepts or sorted(CONCEPTS)
    lr_scales = parse_lr_scales(args.lr_scale)
    pair, oracle, settings = load_world(args)
    report = run_quality(pair, oracle, concepts=args.concepts, seeds=args.seeds, steps=args.steps,
                         methods=args.methods, images_per_prompt=args.images_per_prompt, lr_scales=lr_scales,
                         captions=not args.templates, out=args.out,
                         settings={**settings, "command": command_line(args)}, resume=args.resume, log=_log)
    print(markdown(report))
    print(f"wrote {Path(args.out) / 'quality.json'} and {Path(args.out) / 'quality.md'}")
    return 0


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folders", nargs="+", help="--out folders of `bench quality` runs to merge")
    parser.add_argument("--out", required=True, help="folder for the merged quality.json and quality.md")


def merge_from_args(args: argparse.Namespace) -> int:
    report = merge_reports(args.folders, args.out)
    print(markdown(report))
    print(f"wrote {Path(args.out) / 'quality.json'} and {Path(args.out) / 'quality.md'}")
    return 0


def _log(message: str) -> None:
    print(f"[quality] {message}", file=sys.stderr, flush=True)
