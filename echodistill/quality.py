"""`echodistill bench quality`: what each part of EchoDistill buys, against student-only baselines.

    echodistill bench quality --steps 200 --seeds 0 1 --out runs/quality

On the mini world's held-out concepts (echodistill.miniworld), for every concept x seed, each
method trains with the same step budget on the concept's five references; its images for the
concept's evaluation prompts (student: 1 step; teacher: 25 DDIM steps, CFG 7.5) are scored by
the oracle: subject fidelity (is it the concept?) and prompt fidelity (is it where, how large and
on what the prompt says?). The table reports mean ± std over concepts x seeds and training time.

Rows (METHODS): EchoDistill and its ablations (no echo, no adversarial loss, no shared text
encoder, sequential teacher-then-student) train with `Trainer`; the student-only baselines
(Custom Diffusion, Textual Inversion, DreamBooth-LoRA) with `baselines.StudentBaseline`; the
teacher row samples the teacher side of the full EchoDistill run (its training time is that
run's). Every concept goes through `jobs.sample`, as a user's would. A reference row, the
class-word prior (the untrained student given the prompts without the token), shows the floor.

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

from .benchmarking import BenchError
from .config import TrainConfig, preset
from .tensor_files import atomic_write_text

TOKEN = "<v*>"
RESOLUTION = 64  # the mini world's image size
TEACHER_STEPS, TEACHER_GUIDANCE = 25, 7.5
PRIOR = "class_prior"


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


def echodistill_config(class_word: str, steps: int, seed: int, **changes) -> TrainConfig:
    """The paper preset at the mini world's size, echo rounds scaled to the step budget (as the demo)."""
    return preset("paper", steps=steps, resolution=RESOLUTION, token=TOKEN, class_word=class_word, seed=seed,
                  echo_start=max(1, steps // 2), echo_every=max(1, steps // 4), echo_samples=8,
                  sample_every=0, save_every=0, **changes)


def method_config(name: str, class_word: str, steps: int, seed: int) -> TrainConfig:
    from .baselines import baseline_config

    method = METHODS[name]
    if method.baseline:
        return baseline_config(method.baseline, steps=steps, resolution=RESOLUTION, token=TOKEN,
                               class_word=class_word, seed=seed)
    return echodistill_config(class_word, steps, seed, **method.changes)


def _training_runs(methods: Sequence[str]) -> list[str]:
    """The trainings the rows need: the teacher row is the teacher side of the full run."""
    runs = [m for m in methods if m != "teacher"]
    if "teacher" in methods and "echodistill" not in runs:
        runs.insert(0, "echodistill")
    return runs


def train_method(pair, name: str, config: TrainConfig, images) -> tuple[Any, float]:
    """(ConceptBundle, wall seconds) of one training run; the pair is handed back unchanged."""
    from .baselines import StudentBaseline
    from .pristine import pristine
    from .trainer import Trainer

    method = METHODS[name]
    with torch.inference_mode(False), torch.enable_grad(), pristine(pair):
        started = time.perf_counter()
        if method.baseline:
            bundle = StudentBaseline(pair, images, config, method.baseline).train()
        else:
            bundle = Trainer(pair, images, config).train()
        return bundle, time.perf_counter() - started


# --- one concept x seed ----------------------------------------------------------------------------

def _score(oracle, images: torch.Tensor, references: torch.Tensor, stated: list[dict]) -> dict[str, float]:
    return {"subject_fidelity": float(oracle.subject_fidelity(images, references)),
            "prompt_fidelity": float(oracle.prompt_fidelity(images, stated).mean())}


def evaluate_unit(pair, oracle, concept, seed: int, *, steps: int, methods: Sequence[str], images_per_prompt: int,
                  bundle_dir: Path | None = None, log: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """Train every method on one concept with one seed and score it: (records, {row: images})."""
    from PIL import Image

    from .data import load_concept_images
    from .jobs import sample
    from .miniworld import evaluation_prompts, reference_images

    references = reference_images(concept)  # (5, 64, 64, 3) uint8
    reference_pixels = torch.from_numpy(references).permute(0, 3, 1, 2).float() / 255.0  # (5, 3, 64, 64)
    images = load_concept_images([Image.fromarray(a) for a in references], resolution=RESOLUTION)
    prompts = evaluation_prompts(concept)
    texts = [p.text.format(token=TOKEN) for p in prompts for _ in range(images_per_prompt)]
    stated = [p.stated for p in prompts for _ in range(images_per_prompt)]
    # The same noise for every method of this unit: rows differ by training alone.
    common = dict(seeds=[seed * 100_000 + i for i in range(len(texts))], width=RESOLUTION, height=RESOLUTION,
                  return_latents=False)

    base = {"concept": concept.name, "seed": seed}
    prior_texts = [" ".join(text.replace(TOKEN, "").split()) for text in texts]
    prior = sample(pair, prior_texts, part="student", **common).images  # (N, 3, 64, 64)
    records = [{**base, "method": PRIOR, **_score(oracle, prior, reference_pixels, stated),
                "train_seconds": None, "seconds_per_step": None}]
    rows = {PRIOR: prior}
    for run in _training_runs(methods):
        config = method_config(run, concept.class_word, steps, seed)
        bundle, seconds = train_method(pair, run, config, images)
        if bundle_dir is not None:
            bundle.save(bundle_dir / f"{concept.name}-seed{seed}-{run}.safetensors")
        sides = [(run, "student", {})] if run in methods else []
        if run == "echodistill" and "teacher" in methods:
            sides.append(("teacher", "teacher", {"steps": TEACHER_STEPS, "guidance": TEACHER_GUIDANCE}))
        for row, part, options in sides:
            generated = sample(pair, texts, concept=bundle, part=part, **common, **options).images
            scores = _score(oracle, generated, reference_pixels, stated)
            records.append({**base, "method": row, **scores, "train_seconds": seconds,
                            "seconds_per_step": seconds / steps, "trained_as": run})
            rows[row] = generated
            log(f"{concept.name} seed {seed}: {row:<18} trained {seconds:7.1f} s ({seconds / steps:.3f} s/step)  "
                f"subject {scores['subject_fidelity']:.3f}  prompt {scores['prompt_fidelity']:.3f}")
    return records, rows


# --- the whole table -------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(records: list[dict], methods: Sequence[str]) -> list[dict]:
    """One row per method (the prior first): mean ± std over concepts x seeds, and per concept."""
    summary = []
    for name in [PRIOR, *methods]:
        runs = [r for r in records if r["method"] == name]
        timed = [r for r in runs if r["train_seconds"] is not None]
        concepts = sorted({r["concept"] for r in runs})
        summary.append({
            "method": name,
            "label": PRIOR_LABEL if name == PRIOR else METHODS[name].label,
            "runs": len(runs),
            "subject_fidelity": _mean_std([r["subject_fidelity"] for r in runs]),
            "prompt_fidelity": _mean_std([r["prompt_fidelity"] for r in runs]),
            "train_seconds": _mean_std([r["train_seconds"] for r in timed]),
            "seconds_per_step": _mean_std([r["seconds_per_step"] for r in timed]),
            "subject_fidelity_per_concept": {
                c: statistics.fmean(r["subject_fidelity"] for r in runs if r["concept"] == c) for c in concepts
            },
        })
    return summary


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def run_quality(pair, oracle, *, concepts: Sequence[str], seeds: Sequence[int], steps: int, methods: Sequence[str],
                images_per_prompt: int = 4, out: str | Path | None = None, settings: dict | None = None,
                resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train, sample and score every method on every concept x seed; write the report as it grows."""
    from .miniworld import CONCEPTS

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise BenchError(f"methods {list(methods)}: give one or more of {', '.join(METHODS)}")
    missing = [c for c in concepts if c not in CONCEPTS]
    if missing or not concepts:
        raise BenchError(f"concepts {list(concepts)}: give one or more of {', '.join(sorted(CONCEPTS))}")
    if not seeds or min(seeds) < 0 or images_per_prompt < 1:
        raise BenchError(f"seeds {list(seeds)}, images per prompt {images_per_prompt}: need seeds >= 0, images >= 1")
    for run in _training_runs(methods):  # a bad config fails now, not hours into the run
        method_config(run, CONCEPTS[concepts[0]].class_word, steps, 0)

    settings = {**(settings or {}), "concepts": list(concepts), "seeds": list(seeds), "steps": steps,
                "methods": list(methods), "images_per_prompt": images_per_prompt, "resolution": RESOLUTION,
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

    wanted = {PRIOR, *methods}
    for name in concepts:
        for seed in seeds:
            done = {r["method"] for r in records if r["concept"] == name and r["seed"] == seed}
            if wanted <= done:
                log(f"{name} seed {seed}: already in {report_path}, skipped")
                continue
            records = [r for r in records if not (r["concept"] == name and r["seed"] == seed)]
            unit, rows = evaluate_unit(pair, oracle, CONCEPTS[name], seed, steps=steps, methods=methods,
                                       images_per_prompt=images_per_prompt,
                                       bundle_dir=out / "bundles" if out else None, log=log)
            records += unit
            if out:
                _save_sheet(out / "sheets" / f"{name}-seed{seed}.png", CONCEPTS[name], rows, images_per_prompt)
                atomic_write_text(report_path, json.dumps(report(), indent=2) + "\n")
    final = report()
    if out:
        atomic_write_text(out / "quality.md", markdown(final) + "\n")
    return final


def _save_sheet(path: Path, concept, rows: dict[str, torch.Tensor], images_per_prompt: int) -> None:
    """References, then one labelled row per method: the first image of each prompt."""
    from PIL import Image, ImageDraw

    from .imaging import grid, save_png
    from .miniworld import reference_images

    references = torch.from_numpy(reference_images(concept)).permute(0, 3, 1, 2).float() / 255.0
    pictures = [("references", grid(references))]
    pictures += [(name, grid(images[::images_per_prompt])) for name, images in rows.items()]
    label_width, gap = 130, 2
    sheet = Image.new("RGB", (label_width + max(p.width for _, p in pictures),
                              sum(p.height + gap for _, p in pictures)), (255, 255, 255))
    draw, top = ImageDraw.Draw(sheet), 0
    for label, picture in pictures:
        draw.text((4, top + picture.height // 2 - 6), label, fill=(30, 30, 30))
        sheet.paste(picture, (label_width, top))
        top += picture.height + gap
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
        f"Command: `{s.get('command', 'run_quality(...)')}`",
        "",
        f"- {len(s['concepts'])} concepts x {len(s['seeds'])} seeds = {runs} runs per method, {s['steps']} training "
        f"steps each; {s['images_per_prompt']} image(s) per evaluation prompt; student {s['student_steps']} step, "
        f"teacher {s['teacher_steps']} DDIM steps at CFG {s['teacher_guidance']}; {s['resolution']}x{s['resolution']}",
        f"- models: {json.dumps(s['fingerprints'], sort_keys=True)}",
    ]
    if "oracle" in s:
        lines.append(f"- oracle: `{s['oracle']['path']}` ({json.dumps(s['oracle']['digests'], sort_keys=True)})")
    if "device" in s:
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
    parser.add_argument("--oracle", help="oracle weights folder (default: the shipped mini-world oracle)")
    parser.add_argument("--out", default="runs/quality", help="folder for quality.json, quality.md, sheets/, bundles/")
    parser.add_argument("--resume", action="store_true", help="keep the finished concept x seed runs in --out")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own)")


def _shown(path: Path) -> str:
    """A path as a reader can use it elsewhere: relative to the working folder when it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def command_line(args: argparse.Namespace) -> str:
    """The exact, complete command for these settings (every default spelled out)."""
    parts = ["echodistill", "bench", "quality", "--concepts", *args.concepts, "--seeds", *map(str, args.seeds),
             "--steps", str(args.steps), "--methods", *args.methods, "--images-per-prompt",
             str(args.images_per_prompt), "--oracle", _shown(args.oracle), "--out", str(args.out),
             "--device", args.device]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    if args.resume:
        parts.append("--resume")
    return shlex.join(parts)


def run_from_args(args: argparse.Namespace) -> int:
    from .benchmarking import device_name
    from .miniworld import CONCEPTS, ORACLE_ROOT, STUDENT_DIR, TEACHER_DIR, Oracle
    from .miniworld.oracle import ENCODER_FILE, READER_FILE
    from .models import load_model_pair

    if args.threads is not None:
        if args.threads < 1:
            raise BenchError(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    args.concepts = args.concepts or sorted(CONCEPTS)
    args.oracle = Path(args.oracle or ORACLE_ROOT)
    oracle = Oracle.load(args.oracle)  # before anything trains: a missing oracle fails at once
    pair = load_model_pair(TEACHER_DIR, STUDENT_DIR, device=args.device)
    settings = {
        "command": command_line(args),
        "oracle": {"path": _shown(args.oracle),
                   "digests": {f: _file_digest(args.oracle / f) for f in (READER_FILE, ENCODER_FILE)}},
        "device": device_name(pair.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    report = run_quality(pair, oracle, concepts=args.concepts, seeds=args.seeds, steps=args.steps,
                         methods=args.methods, images_per_prompt=args.images_per_prompt, out=args.out,
                         settings=settings, resume=args.resume, log=_log)
    print(markdown(report))
    print(f"wrote {Path(args.out) / 'quality.json'} and {Path(args.out) / 'quality.md'}")
    return 0


def _log(message: str) -> None:
    print(f"[quality] {message}", file=sys.stderr, flush=True)
