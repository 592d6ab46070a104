"""The main job on the embedded default: one held-out mini-world concept, end to end, on a CPU.

Train the concept with EchoDistill on the shipped mini-world teacher + student (the same loader,
trainer and samplers real SD 2.1 / SD-Turbo go through), draw the concept's evaluation prompts
with the student in one step and with the teacher in 25, write a contact sheet
(references | student | teacher) and report the oracle metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image

from ..concepts.bundle import ConceptBundle
from ..imaging import contact_sheet, save_png
from ..miniworld import CONCEPTS, STUDENT_DIR, TEACHER_DIR, Oracle
from ..miniworld.procedural import lookup_subject
from ..miniworld.recipe import DEMO_SEED, DEMO_STEPS, EVAL_IMAGES_PER_PROMPT, preset_config
from ..miniworld.scoring import TEACHER_GUIDANCE, TEACHER_STEPS, UnitInputs, score_prior
from ..models.pair import load_model_pair
from ..models.pristine import pristine
from ..errors import ConfigError
from ..files import atomic_write_text, check_writable
from ..training.callbacks import Callbacks
from ..training.checkpointing import CHECKPOINT_NAME
from ..training.trainer import Trainer

DEFAULT_STEPS = DEMO_STEPS


@dataclass
class DemoReport:
    concept: str
    steps: int
    seed: int
    images_per_prompt: int  # pictures scored per evaluation prompt (the sheet shows each prompt's first)
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


class DemoOutputs(NamedTuple):
    """Where a demo of one subject writes into its output folder."""

    bundle: Path
    contact_sheet: Path
    metrics: Path
    checkpoint: Path  # in run/, which every subject's demo in this folder shares (and replaces: no demo resumes)


def demo_outputs(out_dir: str | os.PathLike, concept_name: str) -> DemoOutputs:
    out_dir = Path(out_dir)
    return DemoOutputs(out_dir / f"{concept_name}.safetensors", out_dir / f"{concept_name}_contact_sheet.png",
                       out_dir / f"{concept_name}_metrics.json", out_dir / "run" / CHECKPOINT_NAME)


def staged_outputs(outputs: DemoOutputs) -> DemoOutputs:
    """Where a demo writes its results before moving them into place, all three together: run/."""
    run_dir = outputs.checkpoint.parent
    return DemoOutputs(*(run_dir / path.name for path in outputs[:3]), outputs.checkpoint)


def refuse_to_replace(out_dir: str | os.PathLike, concept_name: str, overwrite: bool = False) -> None:
    """Unless `overwrite`, refuse a demo whose results `out_dir` already holds from an earlier one (its subject's
    bundle, sheet or metrics; not the shared run/ checkpoint, which no demo resumes): ConfigError naming the
    folder, the files and the two ways on, as `echodistill train` refuses to replace a bundle. Cheap: before
    anything loads."""
    outputs = demo_outputs(out_dir, concept_name)
    written = [*outputs[:3], *staged_outputs(outputs)[:3]]
    in_the_way = [path for path in written if path.is_dir()]
    if in_the_way:  # not even --overwrite replaces a folder: said now, not after minutes of training
        names = ", ".join(path.relative_to(out_dir).as_posix() for path in in_the_way)
        raise ConfigError(f"out_dir={out_dir}: {names} is a folder where the demo writes a file: move it away, "
                          "or pick another out_dir=...", parameters=("out_dir",))
    if overwrite:
        return
    found = [path for path in (outputs.bundle, outputs.contact_sheet, outputs.metrics) if path.exists()]
    if found:
        names = ", ".join(path.relative_to(out_dir).as_posix() for path in found)
        raise ConfigError(f"out_dir={out_dir} holds an earlier demo's results ({names}): pick another out_dir=..., "
                          "or pass overwrite=True to run the demo anew and replace them",
                          parameters=("out_dir", "overwrite"))


def demo_config(concept_name: str, steps: int, seed: int, overrides: dict | None = None):
    """The demo's TrainConfig for `concept_name` (recipe.tuned_config with `overrides`).

    Raises ConfigError for a bad value (steps < 1, an unknown field), every problem at once, and ValueError for
    an unknown subject: cheap checks the command line runs before it prints anything.
    """
    concept = lookup_subject(concept_name)
    return preset_config({"class_word": concept.class_word, "steps": steps, "seed": seed, **(overrides or {})})


def run_demo(out_dir: str | Path, *, concept_name: str | None = None, steps: int = DEFAULT_STEPS, seed: int = DEMO_SEED,
             overrides: dict | None = None, callbacks: Callbacks | None = None, overwrite: bool = False) -> DemoReport:
    """Train, sample, measure; `callbacks` observe and steer the training (the command line's show a bar).
    An earlier demo's results in `out_dir` are refused unless `overwrite` (refuse_to_replace)."""
    name = concept_name or sorted(CONCEPTS)[0]
    concept = lookup_subject(name)  # a shipped subject or a fresh procedural one ("procedural_<seed>")
    config = demo_config(name, steps, seed, overrides)  # bad values fail before a file is touched
    refuse_to_replace(out_dir, name, overwrite)
    outputs = demo_outputs(out_dir, name)
    out_dir = check_writable(out_dir, "output folder")  # before a model is loaded or a step taken
    oracle = Oracle.load()  # before training: a missing file should cost seconds, not a run
    pair = load_model_pair(TEACHER_DIR, STUDENT_DIR)
    # Trained, drawn and scored as bench quality does it: captioned references, its rates, its prompts, pictures
    # per prompt and noise, so the demo's numbers are its table row for this subject and seed.
    unit = UnitInputs.build(concept, seed, images_per_prompt=EVAL_IMAGES_PER_PROMPT, captions=True)

    # Every result is written into run/ first and moved into place at the end, all three together: a demo stopped
    # on the way, or failing to write, leaves an earlier demo's results as they were (not one file of each).
    run_dir, staged = outputs.checkpoint.parent, staged_outputs(outputs)
    started = time.perf_counter()
    with pristine(pair):  # training adds the token and adapters; the samplers below apply the bundle themselves
        trainer = Trainer(pair, unit.images, config, run_dir=run_dir, callbacks=callbacks)
        trainer.train().save(staged.bundle)
    train_seconds = time.perf_counter() - started
    bundle = ConceptBundle.load(staged.bundle)  # written just above by our trainer: no shape check needed

    student = unit.sample(pair, concept=bundle, part="student")
    teacher = unit.sample(pair, concept=bundle, part="teacher", steps=TEACHER_STEPS, guidance=TEACHER_GUIDANCE)
    base, _ = score_prior(pair, oracle, unit)  # the untrained student, prompts without the token
    student_scores, teacher_scores = unit.score(oracle, student), unit.score(oracle, teacher)

    first = slice(None, None, EVAL_IMAGES_PER_PROMPT)  # the sheet shows each prompt's first picture
    sheet = _contact_sheet(unit.reference_pixels, student[first], teacher[first], unit.texts[first])
    save_png(sheet, staged.contact_sheet, {"echodistill": json.dumps(
        {"concept": name, "prompts": unit.texts[first], "seeds": unit.noise_seeds[first]})})
    report = DemoReport(
        concept=name, steps=config.steps, seed=config.seed,  # overrides' steps and seed win, as in training
        images_per_prompt=EVAL_IMAGES_PER_PROMPT, train_seconds=train_seconds,
        student_subject_fidelity=student_scores["subject_fidelity"],
        teacher_subject_fidelity=teacher_scores["subject_fidelity"],
        student_prompt_fidelity=student_scores["prompt_fidelity"],
        teacher_prompt_fidelity=teacher_scores["prompt_fidelity"],
        base_student_subject_fidelity=base["subject_fidelity"],
        contact_sheet=str(outputs.contact_sheet), bundle=str(outputs.bundle),
    )
    atomic_write_text(staged.metrics, json.dumps(report.__dict__, indent=2) + "\n")
    with _stop_signals_held():  # a Ctrl-C between two renames would leave one new file beside two old ones
        for source, target in zip(staged[:3], outputs[:3]):
            os.replace(source, target)  # the same file system: each a rename
    return report


@contextlib.contextmanager
def _stop_signals_held():
    """SIGINT and SIGTERM held back (delivered on leaving) where the platform can (POSIX, main thread)."""
    stops = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _contact_sheet(references: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                   prompts: list[str]) -> Image.Image:
    """The references, then each prompt's column: its text, the student's picture, the teacher's (in [0, 1])."""
    rows = [("student, 1 step", student), (f"teacher, {TEACHER_STEPS} steps", teacher)]
    return contact_sheet(references, rows, prompts, columns=6, zoom=2)  # 64 px is hard to judge at its size
