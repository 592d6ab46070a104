"""The mini world's oracle numbers for a fleet's finished mini-world concepts (`fleet report --metrics`).

Scored as the demo and `bench quality` score them (miniworld/scoring.py): the subject's evaluation
prompts drawn by the student in one step with the bundle (4 pictures per prompt), the same noise, the world's
oracles. The scores go to out/fleet-metrics.json, never into the state file the driver alone writes, each with
the identity of the bundle file it scored (state.bundle_identity): a bundle trained anew since shows no score.
"""

from __future__ import annotations

import json

from ..concepts.bundle import ConceptBundle
from ..errors import EchoDistillError
from ..models.tensor_files import atomic_write_text
from .manifest import subject_of
from .state import FINISHED, METRICS_NAME, FleetState, bundle_identity


def _unit(record: dict, bundle: ConceptBundle):
    """The concept x seed unit a finished record is scored on; EchoDistillError when it has none."""
    from ..miniworld.recipe import EVAL_IMAGES_PER_PROMPT
    from ..miniworld.scoring import UnitInputs

    subject = record.get("subject")
    try:
        concept = subject_of(f"miniworld/{subject}") if isinstance(subject, str) else None
    except ValueError as exc:
        raise EchoDistillError(str(exc)) from None
    if concept is None:
        raise EchoDistillError(f"subject {subject!r} is no mini-world subject")
    seed = bundle.config.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise EchoDistillError(f"the bundle's config has seed {seed!r}, not a whole number")
    try:
        return UnitInputs.build(concept, seed, images_per_prompt=EVAL_IMAGES_PER_PROMPT, captions=True)
    except ValueError as exc:  # a seed the evaluation noise cannot be drawn for: trained, but not scorable
        raise EchoDistillError(f"not scored: {exc}") from None


def score_miniworld(state: FleetState) -> dict[str, dict]:
    """Score every finished mini-world concept of `state` and write out/fleet-metrics.json (atomically).

    Returns {concept name: {"bundle": identity, "subject_fidelity", "prompt_fidelity"} or {"bundle": ...,
    "metrics_error": why}}. A record that cannot be scored (its bundle gone, damaged, trained on other base models,
    an unknown subject, a seed beyond the evaluation's noise) gets its reason, and the others are still scored.
    """
    from ..miniworld import STUDENT_DIR, TEACHER_DIR, Oracle
    from ..models.pair import load_model_pair

    records = {name: r for name, r in state.concepts.items()
               if r.get("status") in FINISHED and r.get("subject") and r.get("bundle")}
    pair = oracle = None
    scores: dict[str, dict] = {}
    scored: dict[tuple, dict] = {}  # (bundle file, subject): its scores, for records that share a bundle
    for name, record in sorted(records.items()):
        path = record["bundle"]
        entry = scores[name] = {"bundle": bundle_identity(path) if isinstance(path, str) else None}
        # no file, no key: each missing file's reason names its own path
        key = (json.dumps(entry["bundle"], sort_keys=True), str(record.get("subject"))) if entry["bundle"] else None
        if key in scored:
            entry.update(scored[key])
            continue
        try:
            if not isinstance(path, str):
                raise EchoDistillError(f"the state names bundle {path!r}, not a file path")
            bundle = ConceptBundle.load(path)
            if pair is None:  # loaded once, and only when something is to be scored
                pair, oracle = load_model_pair(TEACHER_DIR, STUDENT_DIR), Oracle.load()
            bundle.check_base(pair)  # trained on other base models: the world's oracles do not apply
            unit = _unit(record, bundle)
        except EchoDistillError as exc:
            entry["metrics_error"] = str(exc)
            if key:
                scored[key] = {"metrics_error": str(exc)}
            continue
        scored[key] = unit.score(oracle, unit.sample(pair, concept=bundle, part="student"))
        entry.update(scored[key])
    atomic_write_text(state.out / METRICS_NAME, json.dumps(scores, indent=2, sort_keys=True) + "\n")
    return scores
