"""`echodistill bench lr-sweep`: each method's learning rate, chosen on a tuning run before the table.

    echodistill bench lr-sweep --concept smiley --seed 100 --steps 100 --factors 0.3 1 3 10

The published learning rates were set for SD-sized weights and ~1000 steps; the mini world's
weights are several times larger per element and its runs ten times shorter. So every family of
`bench quality` (EchoDistill with its ablations, and each student-only baseline) trains at each
factor x its published rates on one concept and seed, with the same step budget, and is scored by
the oracle. The chosen factor is the one with the highest subject fidelity among those that keep
prompt fidelity within PROMPT_TOLERANCE of the class-word prior's (a rate that makes the student
ignore the prompt is not a better personalization). Pick a seed outside the table's seeds, or tune on a
fresh procedural subject (`--concept procedural_<seed>`) that no row of the table scores.

Outputs in --out: lr_sweep.json (every score, the choice) and lr_sweep.md; the last line printed is
the `--lr-scale` argument to give `bench quality`.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Callable, Sequence

from ..miniworld.procedural import lookup_subject
from ..miniworld.recipe import caption_states
from ..miniworld.scoring import UnitInputs, score_prior
from ..models.tensor_files import atomic_write_text
from .measuring import BenchError
from .methods import LR_FAMILIES, METHODS
from .names import held_out_subjects
from .quality import train_and_score

PROMPT_TOLERANCE = 0.05  # prompt fidelity a chosen rate may lose against the class-word prior


def choose_factor(scores: dict[float, dict[str, float]], prior_prompt_fidelity: float) -> float:
    """The factor with the best subject fidelity among those within the prompt tolerance.

    If every factor loses the prompt, the one that loses it least.
    """
    floor = prior_prompt_fidelity - PROMPT_TOLERANCE
    keeping = {f: s for f, s in scores.items() if s["prompt_fidelity"] >= floor}
    if not keeping:
        return max(scores, key=lambda f: (scores[f]["prompt_fidelity"], -f))
    return max(keeping, key=lambda f: (keeping[f]["subject_fidelity"], -f))  # ties: the smaller rate


def run_lr_sweep(pair, oracle, *, concept: str, seed: int, steps: int, factors: Sequence[float],
                 families: Sequence[str] = LR_FAMILIES, images_per_prompt: int = 1, captions: bool = True,
                 out: str | Path | None = None, settings: dict | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Train every family at every factor on one concept x seed; score it; choose each family's factor.

    `concept`: a held-out concept's name, or a fresh procedural subject ("procedural_<seed>"): tuning on a
    subject no row of the table scores keeps the table's subjects out of the choice. Raises BenchError for
    an unknown concept or family, or factors, steps or images out of range."""
    [concept] = held_out_subjects([concept], "concept")
    unknown = [f for f in families if f not in LR_FAMILIES]
    if unknown or not families:
        raise BenchError(f"families {list(families)}: give one or more of {', '.join(LR_FAMILIES)}")
    if not factors or min(factors) <= 0 or steps < 1 or images_per_prompt < 1:
        raise BenchError(f"factors {list(factors)}, steps {steps}, images per prompt {images_per_prompt}: "
                         "need factors > 0, steps >= 1, images >= 1")
    unit = UnitInputs.build(lookup_subject(concept), seed, images_per_prompt, captions=captions)
    prior, _ = score_prior(pair, oracle, unit)
    records = []
    for family in families:
        for factor in sorted(factors):
            run_records, _ = train_and_score(pair, oracle, unit, family, [family], steps=steps, lr_scale=factor,
                                             log=log)
            records += run_records
    chosen = {}
    for family in families:
        scores = {r["lr_scale"]: r for r in records if r["method"] == family}
        chosen[family] = choose_factor(scores, prior["prompt_fidelity"])
    report = {"benchmark": "lr_sweep",
              "settings": {**(settings or {}), "concept": concept, "seed": seed, "steps": steps,
                           "factors": sorted(factors), "families": list(families),
                           "images_per_prompt": images_per_prompt, "captions": captions,
                           "caption_states": caption_states(captions),
                           "prompt_tolerance": PROMPT_TOLERANCE, "fingerprints": pair.fingerprints()},
              "prior": prior, "records": records, "chosen": chosen}
    if out:
        out = Path(out)
        atomic_write_text(out / "lr_sweep.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(out / "lr_sweep.md", markdown(report) + "\n")
    return report


def lr_scale_argument(chosen: dict[str, float]) -> str:
    return shlex.join(["--lr-scale", *(f"{family}={factor:g}" for family, factor in chosen.items())])


def markdown(report: dict) -> str:
    s, prior = report["settings"], report["prior"]
    factors = s["factors"]
    lines = [
        "# Learning-rate sweep for the quality benchmark (mini world)",
        "",
        f"Command: `{s.get('command', 'run_lr_sweep(...)')}`",
        "",
        f"- concept {s['concept']}, seed {s['seed']}, {s['steps']} steps, {s['images_per_prompt']} image(s) per "
        f"prompt, references {'captioned in the grammar' if s['captions'] else 'with the prompt templates'}",
        f"- cells: subject fidelity / prompt fidelity at factor x the published learning rates; the class-word "
        f"prior scores {prior['subject_fidelity']:.3f} / {prior['prompt_fidelity']:.3f}",
        f"- chosen (**bold**): best subject fidelity with prompt fidelity >= prior - {s['prompt_tolerance']}",
        "",
        "| family | " + " | ".join(f"x{f:g}" for f in factors) + " |",
        "|:--|" + "--:|" * len(factors),
    ]
    for family in s["families"]:
        cells = []
        for factor in factors:
            record = next(r for r in report["records"] if r["method"] == family and r["lr_scale"] == factor)
            cell = f"{record['subject_fidelity']:.3f} / {record['prompt_fidelity']:.3f}"
            cells.append(f"**{cell}**" if report["chosen"][family] == factor else cell)
        lines.append(f"| {family} ({METHODS[family].label}) | " + " | ".join(cells) + " |")
    lines += ["", f"Give `bench quality`: `{lr_scale_argument(report['chosen'])}`"]
    return "\n".join(lines)
