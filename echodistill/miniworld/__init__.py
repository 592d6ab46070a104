"""A shipped mini text-to-image world: the same code path as SD 2.1 + SD-Turbo, in minutes on a CPU.

    from echodistill.miniworld import TEACHER_DIR, STUDENT_DIR, Oracle, CONCEPTS
    pair = load_model_pair(TEACHER_DIR, STUDENT_DIR)          # the real loader, no special case
    images = sample_student(pair, ["a large red circle on the left, on a blue striped background"],
                            seeds=0, width=64, height=64).images

Parts:
  grammar.py       the vocabulary, scenes as attributes, captions ("a small blue ring at the top, ...")
  drawing.py       drawing primitives: layouts, backgrounds, shape masks, compositing
  render.py        deterministic 64×64 renderer of scenes
  concepts.py      six held-out subjects with references and evaluation prompts ("{token}")
  recipe.py        how a concept trains on the mini world (the demo's and bench quality's config and rates)
  scoring.py       how a concept is scored: UnitInputs (references, prompts, noise) and the oracle's numbers
  architecture.py  model shapes and writing diffusers folders
  training.py      VAE, text encoder + teacher, student distillation (scripts/train_miniworld.py runs them)
  oracle.py        prompt fidelity and subject fidelity, with shipped weights
  evaluate.py      prompt fidelity of the shipped teacher and student through echodistill.sampling
"""

from .architecture import ORACLE_ROOT, SHIPPED_CONCEPT_DIR, STUDENT_DIR, TEACHER_DIR
from .concepts import CONCEPTS, Concept, ConceptPrompt, evaluation_prompts, reference_captions, reference_images
from .grammar import ATTRIBUTES, Caption, Scene, describe, sample_scene, training_caption
from .oracle import Oracle
from .render import render, render_layout

__all__ = [
    "ATTRIBUTES",
    "CONCEPTS",
    "Caption",
    "Concept",
    "ConceptPrompt",
    "ORACLE_ROOT",
    "SHIPPED_CONCEPT_DIR",
    "Oracle",
    "STUDENT_DIR",
    "Scene",
    "TEACHER_DIR",
    "describe",
    "evaluation_prompts",
    "reference_captions",
    "reference_images",
    "render",
    "render_layout",
    "sample_scene",
    "training_caption",
]
