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

from ..benchmarks.quality import (
    TEACHER_GUIDANCE,
    TEACHER_STEPS,
    TUNED_LR_SCALES,
    UnitInputs,
    method_config,
    score_prior,
)
from ..imaging import labelled_rows, save_png
from ..models.pair import load_model_pair
from ..models.pristine import pristine
from ..models.tensor_files import atomic_write_text

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
    from ..concepts.bundle import ConceptBundle
    from ..miniworld import CONCEPTS, STUDENT_DIR, TEACHER_DIR, Oracle

    out_dir = Path(out_dir)
    name = concept_name or sorted(CONCEPTS)[0]
    concept = CONCEPTS[name]
    oracle = Oracle.load()  # before training: a missing file should cost seconds, not a run
    pair = load_model_pair(TEACHER_DIR, STUDENT_DIR)
    # Trained, drawn and scored as bench quality does it: captioned references, its rates, its prompts and noise.
    unit = UnitInputs.build(concept, seed, images_per_prompt=1, captions=True)
    config = method_config("echodistill", concept.class_word, steps, seed, TUNED_LR_SCALES["echodistill"])
    config = config.with_changes(**(overrides or {}))

    started = time.perf_counter()
    with pristine(pair):  # training adds the token and adapters; the samplers below apply the bundle themselves
        bundle_path = run_training(pair, unit.images, config, out=out_dir / f"{name}.safetensors",
                                   run_dir=out_dir / "run")
    train_seconds = time.perf_counter() - started
    bundle = ConceptBundle.load(bundle_path)

    student = unit.sample(pair, concept=bundle, part="student")
    teacher = unit.sample(pair, concept=bundle, part="teacher", steps=TEACHER_STEPS, guidance=TEACHER_GUIDANCE)
    base, _ = score_prior(pair, oracle, unit)  # the untrained student, prompts without the token
    student_scores, teacher_scores = unit.score(oracle, student), unit.score(oracle, teacher)

    sheet = _contact_sheet(unit.reference_pixels, student, teacher)
    sheet_path = save_png(sheet, out_dir / f"{name}_contact_sheet.png", {"echodistill": json.dumps(
        {"concept": name, "prompts": unit.texts, "seeds": unit.noise_seeds})})
    report = DemoReport(
        concept=name, steps=steps, train_seconds=train_seconds,
        student_subject_fidelity=student_scores["subject_fidelity"],
        teacher_subject_fidelity=teacher_scores["subject_fidelity"],
        student_prompt_fidelity=student_scores["prompt_fidelity"],
        teacher_prompt_fidelity=teacher_scores["prompt_fidelity"],
        base_student_subject_fidelity=base["subject_fidelity"],
        contact_sheet=str(sheet_path), bundle=str(bundle_path),
    )
    atomic_write_text(out_dir / f"{name}_metrics.json", json.dumps(report.__dict__, indent=2) + "\n")
    return report


def _contact_sheet(references: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> Image.Image:
    """Three labelled rows: references | student samples | teacher samples (images in [0, 1])."""
    rows = [("references", references), ("student, 1 step", student), ("teacher, 25 steps", teacher)]
    return labelled_rows(rows, columns=6, zoom=2, label_width=120, gap=4)  # 64 px is hard to judge at its size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..miniworld import CONCEPTS

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
    from ..cli import _parse_overrides

    report = run_demo(args.out, concept_name=args.concept, steps=args.steps, seed=args.seed,
                      run_training=run_training, overrides=_parse_overrides(args.set))
    print(report.table())
    print(f"trained in {report.train_seconds:.0f} s; contact sheet {report.contact_sheet}; bundle {report.bundle}")
    return 0
