"""The main job on the embedded default: one held-out mini-world concept, end to end, on a CPU.

Train the concept with EchoDistill on the shipped mini-world teacher + student (the same loader,
trainer and samplers real SD 2.1 / SD-Turbo go through), draw the concept's evaluation prompts
with the student in one step and with the teacher in 25, write a contact sheet
(references | student | teacher) and report the oracle metrics.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .quality import TOKEN, TUNED_LR_SCALES, method_config, training_references
from .pristine import pristine
from .imaging import grid, save_png
from .jobs import sample
from .models import load_model_pair
from .tensor_files import atomic_write_text

DEFAULT_STEPS = 200


@dataclass
class DemoReport:
    concept: str
    steps: int
    train_seconds: float
    student_subject_fidelity: float
    teacher_subject_fidelity: float
    student_prompt_fidelity: float
    teacher_prompt_fidelity: float
    base_student_subject_fidelity: float  # the student before training, same prompts: the bar to beat
    contact_sheet: str
    bundle: str

    def table(self) -> str:
        rows = [
            ("", "subject fidelity", "prompt fidelity"),
            ("student, 1 step", f"{self.student_subject_fidelity:.3f}", f"{self.student_prompt_fidelity:.3f}"),
            ("teacher, 25 steps", f"{self.teacher_subject_fidelity:.3f}", f"{self.teacher_prompt_fidelity:.3f}"),
            ("student before training", f"{self.base_student_subject_fidelity:.3f}", ""),
        ]
        return "\n".join(f"{a:<26}{b:>18}{c:>18}" for a, b, c in rows)


def run_demo(out_dir: str | Path, *, concept_name: str | None = None, steps: int = DEFAULT_STEPS, seed: int = 0,
             run_training=None, overrides: dict | None = None) -> DemoReport:
    """Train, sample, measure; `run_training(pair, images, config, out=, run_dir=)` trains (the CLI's, with a bar)."""
    from .miniworld import CONCEPTS, STUDENT_DIR, TEACHER_DIR, Oracle, evaluation_prompts, reference_images

    out_dir = Path(out_dir)
    name = concept_name or sorted(CONCEPTS)[0]
    concept = CONCEPTS[name]
    oracle = Oracle.load()  # before training: a missing file should cost seconds, not a run
    pair = load_model_pair(TEACHER_DIR, STUDENT_DIR)
    references = training_references(concept)  # as bench quality trains them: captioned in the world's grammar
    config = method_config("echodistill", concept.class_word, steps, seed, TUNED_LR_SCALES["echodistill"])
    config = config.with_changes(**(overrides or {}))

    started = time.perf_counter()
    with pristine(pair):  # training adds the token and adapters; the samplers below apply the bundle themselves
        bundle_path = run_training(pair, references, config, out=out_dir / f"{name}.safetensors",
                                   run_dir=out_dir / "run")
    train_seconds = time.perf_counter() - started
    from .bundle import ConceptBundle

    bundle = ConceptBundle.load(bundle_path)

    prompts = evaluation_prompts(concept)
    texts = [p.text.format(token=TOKEN) for p in prompts]
    seeds = list(range(len(texts)))
    common = dict(seeds=seeds, width=64, height=64, return_latents=False)
    student = sample(pair, texts, concept=bundle, part="student", **common).images
    teacher = sample(pair, texts, concept=bundle, part="teacher", steps=25, **common).images
    base = sample(pair, [" ".join(p.text.format(token="").split()) for p in prompts], part="student",
                  **common).images

    reference_pixels = torch.from_numpy(reference_images(concept)).permute(0, 3, 1, 2).float() / 255.0
    stated = [p.stated for p in prompts]
    sheet = _contact_sheet(reference_pixels, student, teacher)
    sheet_path = save_png(sheet, out_dir / f"{name}_contact_sheet.png",
                          {"echodistill": json.dumps({"concept": name, "prompts": texts, "seeds": seeds})})
    report = DemoReport(
        concept=name, steps=steps, train_seconds=train_seconds,
        student_subject_fidelity=oracle.subject_fidelity(student, reference_pixels),
        teacher_subject_fidelity=oracle.subject_fidelity(teacher, reference_pixels),
        student_prompt_fidelity=float(oracle.prompt_fidelity(student, stated).mean()),
        teacher_prompt_fidelity=float(oracle.prompt_fidelity(teacher, stated).mean()),
        base_student_subject_fidelity=oracle.subject_fidelity(base, reference_pixels),
        contact_sheet=str(sheet_path), bundle=str(bundle_path),
    )
    atomic_write_text(out_dir / f"{name}_metrics.json", json.dumps(report.__dict__, indent=2) + "\n")
    return report


def _contact_sheet(references: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> Image.Image:
    """Three labelled rows: references | student samples | teacher samples (images in [0, 1])."""
    from PIL import ImageDraw

    rows = [("references", references), ("student, 1 step", student), ("teacher, 25 steps", teacher)]
    zoom = 2  # 64-pixel pictures are hard to judge at their own size
    pictures = [picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST)
                for picture in (grid(images, columns=6) for _, images in rows)]
    label_width, gap = 120, 4
    width = label_width + max(p.width for p in pictures)
    sheet = Image.new("RGB", (width, sum(p.height + gap for p in pictures)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    top = 0
    for (label, _), picture in zip(rows, pictures):
        draw.text((6, top + picture.height // 2 - 6), label, fill=(30, 30, 30))
        sheet.paste(picture, (label_width, top))
        top += picture.height + gap
    return sheet


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .miniworld import CONCEPTS

    parser.add_argument("--concept", choices=sorted(CONCEPTS), default=sorted(CONCEPTS)[0],
                        help="which held-out mini-world subject to learn")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training iterations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo-output", help="folder for the bundle, contact sheet and metrics")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any training config field, e.g. --set echo=false")


def run_from_args(args: argparse.Namespace, run_training) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"EchoDistill on the shipped mini world: concept {args.concept!r}, {args.steps} steps, seed {args.seed}")
    from .cli import _parse_overrides

    report = run_demo(args.out, concept_name=args.concept, steps=args.steps, seed=args.seed,
                      run_training=run_training, overrides=_parse_overrides(args.set))
    print(report.table())
    print(f"trained in {report.train_seconds:.0f} s; contact sheet {report.contact_sheet}; bundle {report.bundle}")
    return 0
