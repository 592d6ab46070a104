"""The mini world's oracle numbers for a fleet's finished mini-world concepts (`fleet report --metrics`).

Scored as the demo and `bench quality` score them (miniworld/scoring.py): the subject's evaluation
prompts drawn by the student in one step with the bundle (4 pictures per prompt), the same noise, the world's
oracles.
"""

from __future__ import annotations

from ..concepts.bundle import ConceptBundle
from ..errors import EchoDistillError
from .manifest import subject_of
from .state import FINISHED, FleetState


def score_miniworld(state: FleetState) -> int:
    """Add subject and prompt fidelity to each finished mini-world concept's record; returns how many."""
    from ..miniworld import STUDENT_DIR, TEACHER_DIR, Oracle
    from ..miniworld.recipe import EVAL_IMAGES_PER_PROMPT
    from ..miniworld.scoring import UnitInputs
    from ..models.pair import load_model_pair

    records = [r for r in state.concepts.values()
               if r.get("status") in FINISHED and r.get("subject") and r.get("bundle")]
    if not records:
        return 0
    pair, oracle, scored = load_model_pair(TEACHER_DIR, STUDENT_DIR), Oracle.load(), 0
    for record in records:
        try:
            bundle = ConceptBundle.load(record["bundle"])
            bundle.check_base(pair)  # trained on other base models: the world's oracles do not apply
        except EchoDistillError as exc:
            record["metrics_error"] = str(exc)
            continue
        unit = UnitInputs.build(subject_of(f"miniworld/{record['subject']}"), bundle.config.get("seed", 0),
                                images_per_prompt=EVAL_IMAGES_PER_PROMPT, captions=True)
        scores = unit.score(oracle, unit.sample(pair, concept=bundle, part="student"))
        record.update(subject_fidelity=scores["subject_fidelity"], prompt_fidelity=scores["prompt_fidelity"])
        scored += 1
    return scored
