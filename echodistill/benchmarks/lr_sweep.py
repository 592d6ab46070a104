"""`echodistill bench lr-sweep`: each method's learning rate, chosen on a tuning run before the table.

    echodistill bench lr-sweep --concept procedural_3000002 --seed 100 --steps 400 --factors 0.3 1 3 10

The published learning rates were set for SD-sized weights and ~1000 steps; the mini world's
weights are several times larger per element and its runs ten times shorter. So every family of
`bench quality` (EchoDistill with its ablations, and each student-only baseline) trains at each
factor x its published rates on one concept and seed, with the same step budget, and is scored by
the oracle. The chosen factor is the one with the highest subject fidelity among those that keep
prompt fidelity within PROMPT_TOLERANCE of the class-word prior's (a rate that makes the student
ignore the prompt is not a better personalization). Pick a seed outside the table's seeds, or tune on a
fresh procedural subject (`--concept procedural_<seed>`) that no row of the table scores.

A second stage tunes the concept token row's own rate (TrainConfig.lr_token) of the families that train
it beside adapters (TOKEN_LR_FAMILIES), each at its chosen factor, by the same rule:

    echodistill bench lr-sweep ... --lr-scale echodistill=10 custom_diffusion=1 --token-rates 3e-4 1e-3 3e-3 \
        --out runs/lr_sweep_token

Rate 0 (the row at its adapters' rate, as published) is always among the candidates. A token row is
one vector that every prompt with the token reads: at the adapters' rate (1e-5 x the factor) it barely
moves in a few hundred steps, while a rate as large as the world probe's (1e-2) can drown the prompt.

Outputs in --out: lr_sweep.json (every score, the choice) and lr_sweep.md; the last line printed is
the `--lr-scale` (or `--token-lr`) argument to give `bench quality`.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Callable, Sequence

from ..miniworld.procedural import lookup_subject
from ..miniworld.recipe import EVAL_IMAGES_PER_PROMPT, caption_states
from ..miniworld.scoring import UnitInputs, score_prior
from ..models.tensor_files import atomic_write_text
from .measuring import BenchError
from .methods import LR_FAMILIES, METHODS, TOKEN_LR_FAMILIES, TUNED_LR_SCALES
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


def run_lr_sweep(pair, oracle, *, concept: str, seed: int, steps: int, factors: Sequence[float] = (),
                 families: Sequence[str] = LR_FAMILIES, images_per_prompt: int = EVAL_IMAGES_PER_PROMPT,
                 captions: bool = True,
                 token_rates: Sequence[float] = (), lr_scales: dict[str, float] | None = None,
                 out: str | Path | None = None, settings: dict | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Train every family at every factor on one concept x seed; score it; choose each family's factor.

    With `token_rates`, the second stage instead: every family (of TOKEN_LR_FAMILIES) at its factor from
    `lr_scales` (TUNED_LR_SCALES where not given), its token row at 0 (the adapters' rate) and at each rate.
    `concept`: a held-out concept's name, or a fresh procedural subject ("procedural_<seed>"): tuning on a
    subject no row of the table scores keeps the table's subjects out of the choice. Raises BenchError for
    an unknown concept or family, or factors, rates, steps or images out of range."""
    [concept] = held_out_subjects([concept], "concept")
    allowed = TOKEN_LR_FAMILIES if token_rates else LR_FAMILIES
    unknown = [f for f in families if f not in allowed]
    if unknown or not families:
        stage = " for --token-rates (the families that train a token row beside adapters)" if token_rates else ""
        raise BenchError(f"families {list(families)}: give one or more of {', '.join(allowed)}{stage}")
    candidates = sorted({0.0, *token_rates}) if token_rates else sorted(factors)
    if (not token_rates and (not factors or min(factors) <= 0)) or any(not 0 < r <= 1 for r in token_rates):
        raise BenchError(f"factors {list(factors)}, token rates {list(token_rates)}: need factors > 0, or token "
                         "rates in (0, 1]")
    if steps < 1 or images_per_prompt < 1:
        raise BenchError(f"steps {steps}, images per prompt {images_per_prompt}: need steps >= 1, images >= 1")
    lr_scales = {**TUNED_LR_SCALES, **(lr_scales or {})}
    axis = "token_lr" if token_rates else "lr_scale"
    unit = UnitInputs.build(lookup_subject(concept), seed, images_per_prompt, captions=captions)
    prior, _ = score_prior(pair, oracle, unit)
    records = []
    for family in families:
        for value in candidates:
            rates = {"lr_scale": lr_scales[family], "token_lr": value} if token_rates else {"lr_scale": value}
            run_records, _ = train_and_score(pair, oracle, unit, family, [family], steps=steps, log=log, **rates)
            records += run_records
    chosen = {}
    for family in families:
        scores = {r[axis]: r for r in records if r["method"] == family}
        chosen[family] = choose_factor(scores, prior["prompt_fidelity"])
    stage = ({"token_rates": candidates, "lr_scales": {f: lr_scales[f] for f in families}} if token_rates
             else {"factors": candidates})
    report = {"benchmark": "lr_sweep",
              "settings": {**(settings or {}), "concept": concept, "seed": seed, "steps": steps, **stage,
                           "families": list(families), "images_per_prompt": images_per_prompt,
                           "captions": captions, "caption_states": caption_states(captions),
                           "prompt_tolerance": PROMPT_TOLERANCE, "fingerprints": pair.fingerprints()},
              "prior": prior, "records": records, "chosen": chosen}
    if out:
        out = Path(out)
        atomic_write_text(out / "lr_sweep.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(out / "lr_sweep.md", markdown(report) + "\n")
    return report


def lr_scale_argument(chosen: dict[str, float], flag: str = "--lr-scale") -> str:
    """The `bench quality` argument that gives each family its chosen value (flag: --lr-scale or --token-lr)."""
    return shlex.join([flag, *(f"{family}={value:g}" for family, value in chosen.items())])


def quality_arguments(report: dict) -> str:
    """The `bench quality` arguments a sweep's report chose (the factors too, for a token-rate sweep)."""
    s = report["settings"]
    if "token_rates" not in s:
        return lr_scale_argument(report["chosen"])
    return f"{lr_scale_argument(s['lr_scales'])} {lr_scale_argument(report['chosen'], '--token-lr')}"


def markdown(report: dict) -> str:
    s, prior = report["settings"], report["prior"]
    tokens = "token_rates" in s
    axis, values = ("token_lr", s["token_rates"]) if tokens else ("lr_scale", s["factors"])
    cells_are = ("the concept token row's rate (0: its adapters' rate) at each family's factor x the published "
                 "rates" if tokens else "factor x the published learning rates")
    lines = [
        "# Learning-rate sweep for the quality benchmark (mini world)" + (": the token row's rate" if tokens else ""),
        "",
        f"Command: `{s.get('command', 'run_lr_sweep(...)')}`",
        "",
        f"- concept {s['concept']}, seed {s['seed']}, {s['steps']} steps, {s['images_per_prompt']} image(s) per "
        f"prompt, references {'captioned in the grammar' if s['captions'] else 'with the prompt templates'}",
        f"- cells: subject fidelity / prompt fidelity at {cells_are}; the class-word "
        f"prior scores {prior['subject_fidelity']:.3f} / {prior['prompt_fidelity']:.3f}",
        f"- chosen (**bold**): best subject fidelity with prompt fidelity >= prior - {s['prompt_tolerance']}",
        "",
        "| family | " + " | ".join(f"{v:g}" if tokens else f"x{v:g}" for v in values) + " |",
        "|:--|" + "--:|" * len(values),
    ]
    for family in s["families"]:
        cells = []
        for value in values:
            record = next(r for r in report["records"] if r["method"] == family and r[axis] == value)
            cell = f"{record['subject_fidelity']:.3f} / {record['prompt_fidelity']:.3f}"
            cells.append(f"**{cell}**" if report["chosen"][family] == value else cell)
        factor = f", x{s['lr_scales'][family]:g}" if tokens else ""
        lines.append(f"| {family} ({METHODS[family].label}{factor}) | " + " | ".join(cells) + " |")
    lines += ["", f"Give `bench quality`: `{quality_arguments(report)}`"]
    return "\n".join(lines)
