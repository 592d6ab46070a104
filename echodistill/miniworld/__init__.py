"""A shipped mini text-to-image world: the same code path as SD 2.1 + SD-Turbo, in minutes on a CPU.

    from echodistill.miniworld import TEACHER_DIR, STUDENT_DIR, Oracle, CONCEPTS
    pair = load_model_pair(TEACHER_DIR, STUDENT_DIR)          # the real loader, no special case
    images = sample_student(pair, ["a large red circle on the left, on a blue striped background"],
                            seeds=0, width=64, height=64).images

Parts:
  grammar.py       the vocabulary, scenes as attributes, captions ("a small blue ring at the top, ...")
  drawing.py       drawing primitives: layouts, backgrounds, shape masks, compositing
  render.py        deterministic 64×64 renderer of scenes
  procedural.py    a procedural family of subjects, one per seed; subject names ("miniworld/<subject>")
  concepts.py      six held-out subjects with references and evaluation prompts ("{token}")
  recipe.py        how a concept trains on the mini world (the demo's and bench quality's config and rates)
  scoring.py       how a concept is scored: UnitInputs (references, prompts, noise) and the oracle's numbers
  architecture.py  model shapes and writing diffusers folders
  training.py      VAE, text encoder + teacher, student distillation (scripts/train_miniworld.py runs them)
  oracle.py        prompt fidelity and subject fidelity, with shipped weights
  evaluate.py      prompt fidelity of the shipped teacher and student through echodistill.sampling
"""

from __future__ import annotations

import importlib

# Public name -> the module defining it. Imported on first use (PEP 562): the grammar, drawing, concepts
# and procedural subjects are numpy-only, so `echodistill --help` can list the subjects without torch.
_PUBLIC = {
    "ORACLE_ROOT": "paths", "SHIPPED_CONCEPT_DIR": "paths", "STUDENT_DIR": "paths", "TEACHER_DIR": "paths",
    "CONCEPTS": "concepts", "Concept": "concepts", "ConceptPrompt": "concepts",
    "evaluation_prompts": "concepts", "reference_captions": "concepts", "reference_images": "concepts",
    "ATTRIBUTES": "grammar", "Caption": "grammar", "Scene": "grammar", "describe": "grammar",
    "sample_scene": "grammar", "training_caption": "grammar",
    "Oracle": "oracle",
    "render": "render", "render_layout": "render",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # imported once; later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
