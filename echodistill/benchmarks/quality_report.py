"""The tables of `bench quality`: summaries over concepts x seeds, rows paired against EchoDistill, merging.

Every number a table shows is computed here from the run records quality.py writes.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Sequence

from ..files import atomic_write_text
from .names import BenchError
from .methods import METHODS, PRIOR_LABELS, REFERENCE_METHOD, prior_rows


def _mean_std(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _mean_se(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "se": None}
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "se": se}


def reference_of(name: str) -> str:
    """The row `name` is paired against: EchoDistill (full), or the row its Method names (the teacher without
    echo against the teacher with it)."""
    return (METHODS[name].paired_with if name in METHODS else None) or REFERENCE_METHOD


def paired_against_reference(records: list[dict], name: str) -> dict | None:
    """Its reference row (`reference_of`) minus `name`, unit by unit (same concept, seed and sampling noise).

    Concepts differ far more from each other than methods do, so the mean ± std columns hide
    small but consistent differences; pairing by concept x seed removes that spread. None when
    there is no reference row or `name` is the reference.
    """
    reference = reference_of(name)
    if name == reference:
        return None
    scores = {(r["concept"], r["seed"], r["method"]): r for r in records}
    units = sorted({(c, seed) for c, seed, m in scores if m == name}
                   & {(c, seed) for c, seed, m in scores if m == reference})
    if not units:
        return None
    deltas = {key: [scores[(*u, reference)][key] - scores[(*u, name)][key] for u in units]
              for key in ("subject_fidelity", "prompt_fidelity")}
    return {"units": len(units), "reference": reference, "subject_fidelity": _mean_se(deltas["subject_fidelity"]),
            "prompt_fidelity": _mean_se(deltas["prompt_fidelity"]),
            "reference_wins_subject": sum(d > 0 for d in deltas["subject_fidelity"])}


def summarize(records: list[dict], methods: Sequence[str]) -> list[dict]:
    """One row per method (the priors first): mean ± std over concepts x seeds, per concept, and paired
    against EchoDistill (full)."""
    summary = []
    for name in [*prior_rows(methods), *methods]:
        runs = [r for r in records if r["method"] == name]
        if not runs and name in PRIOR_LABELS:  # a report written before this prior row existed
            continue
        timed = [r for r in runs if r["train_seconds"] is not None]
        concepts = sorted({r["concept"] for r in runs})
        summary.append({
            "method": name,
            "label": PRIOR_LABELS[name] if name in PRIOR_LABELS else METHODS[name].label,
            "runs": len(runs),
            "subject_fidelity": _mean_std([r["subject_fidelity"] for r in runs]),
            "prompt_fidelity": _mean_std([r["prompt_fidelity"] for r in runs]),
            "train_seconds": _mean_std([r["train_seconds"] for r in timed]),
            "seconds_per_step": _mean_std([r["seconds_per_step"] for r in timed]),
            "subject_fidelity_per_concept": {
                c: statistics.fmean(r["subject_fidelity"] for r in runs if r["concept"] == c) for c in concepts
            },
            "reference_minus_this": paired_against_reference(records, name),
        })
    return summary


RECORD_FIELDS = {"concept": str, "seed": int, "method": str}


def read_report(path: Path, how: str = "give a folder `bench quality --out` wrote") -> dict:
    """A quality.json that `bench quality` wrote: a settings object and a list of records, each naming its
    concept, seed and method. Raises BenchError naming the file, what is wrong and `how` to go on."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise BenchError(f"{path} does not exist: {how}") from None
    except IsADirectoryError:
        raise BenchError(f"{path} is a folder, not a report: {how}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise BenchError(f"{path} is not a readable quality report ({error}): {how}") from None
    records = report.get("records") if isinstance(report, dict) else None
    if not (isinstance(report, dict) and isinstance(report.get("settings"), dict) and isinstance(records, list)
            and all(isinstance(r, dict) and all(isinstance(r.get(k), t) and not isinstance(r.get(k), bool)
                                                for k, t in RECORD_FIELDS.items()) for r in records)):
        raise BenchError(f"{path} is not a quality report (settings and records, each record with its concept, "
                         f"seed and method): {how}")
    return report


def caption_line(settings: dict) -> str:
    """How a report's references were captioned in the grammar; reports from before the size was stated
    (2026-11-30) record no caption_states."""
    if "size" in (settings.get("caption_states") or ()):
        return ("with their captions in the world's grammar, size and background (\"a large {} on a plain red "
                "background\")")
    return "with their captions in the world's grammar, background only (\"a {} on a plain red background\")"


def merge_reports(folders: Sequence[str | Path], out: str | Path) -> dict:
    """One report from runs made side by side (e.g. one process per seed) with the same settings.

    Every run must share the settings that make numbers comparable (models, oracle, steps, methods,
    learning rates, ...); their concept x seed units must not overlap. Writes quality.json and
    quality.md into `out`; each run's sheets and bundles stay where they are.
    """
    reports = []
    for folder in folders:
        reports.append(read_report(Path(folder) / "quality.json", "give folders written by `bench quality --out`"))
    if len(reports) < 2:
        raise BenchError("give two or more report folders to merge")
    private = ("command", "commands", "concepts", "seeds", "threads", "device")
    first = {k: v for k, v in reports[0]["settings"].items() if k not in private}
    for folder, report in zip(folders[1:], reports[1:], strict=True):
        other = {k: v for k, v in report["settings"].items() if k not in private}
        differing = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if differing:
            raise BenchError(f"{folder} was run with other settings ({', '.join(differing)}); only runs of "
                             "the same benchmark can be merged")
    records, seen = [], set()
    for folder, report in zip(folders, reports, strict=True):
        for record in report["records"]:
            key = (record["concept"], record["seed"], record["method"])
            if key in seen:
                raise BenchError(f"{folder} repeats {key[0]} seed {key[1]} ({key[2]}): the runs overlap")
            seen.add(key)
            records.append(record)
    concepts = list(dict.fromkeys(c for r in reports for c in r["settings"]["concepts"]))
    seeds = sorted({seed for r in reports for seed in r["settings"]["seeds"]})
    commands = [r["settings"].get("command", "run_quality(...)") for r in reports]
    devices = sorted({r["settings"].get("device") for r in reports if r["settings"].get("device")})
    settings = {**reports[0]["settings"], "concepts": concepts, "seeds": seeds, "commands": commands,
                "command": " ; ".join(commands), "device": " / ".join(devices) or None}
    methods = settings["methods"]
    merged = {"benchmark": "quality", "settings": settings, "records": records,
              "summary": summarize(records, methods)}
    out = Path(out)
    atomic_write_text(out / "quality.json", json.dumps(merged, indent=2) + "\n")
    atomic_write_text(out / "quality.md", markdown(merged) + "\n")
    return merged


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
        *(["Commands (run side by side, merged with `echodistill bench quality-merge`):", "",
           *(f"- `{c}`" for c in s["commands"])] if "commands" in s
          else [f"Command: `{s.get('command', 'run_quality(...)')}`"]),
        "",
        f"- {len(s['concepts'])} concepts x {len(s['seeds'])} seeds = {runs} runs per method, {s['steps']} training "
        f"steps each; {s['images_per_prompt']} image(s) per evaluation prompt; student {s['student_steps']} step, "
        f"teacher {s['teacher_steps']} DDIM steps at CFG {s['teacher_guidance']}; {s['resolution']}x{s['resolution']}",
        f"- models: {json.dumps(s['fingerprints'], sort_keys=True)}",
    ]
    if "captions" in s:
        lines.append("- references trained " + (caption_line(s) if s["captions"] else
                                              "with the trainer's prompt templates (\"a photo of a {}\")"))
    scaled = {family: factor for family, factor in s.get("lr_scales", {}).items() if factor != 1.0}
    if scaled:
        lines.append("- learning rates scaled from the published ones (the ablations and the teacher row follow "
                     "echodistill): " + ", ".join(f"{family} x{factor:g}" for family, factor in scaled.items()))
    token_rates = {family: rate for family, rate in s.get("token_lrs", {}).items() if rate}
    if token_rates:
        lines.append("- the concept token row trained at its own rate (else at its adapters'): "
                     + ", ".join(f"{family} {rate:g}" for family, rate in token_rates.items()))
    if "oracle" in s:
        lines.append(f"- oracle: `{s['oracle']['path']}` ({json.dumps(s['oracle']['digests'], sort_keys=True)})")
    if "image_prompt" in s:
        lines.append(f"- image-prompt adapter (the zero-training row, trained once on procedural subjects, none of "
                     f"the table's): `{s['image_prompt']['path']}` ({s['image_prompt']['digest']})")
    if s.get("device"):
        lines.append(f"- device: {s['device']}, torch {s.get('torch')}")
    untrained = "; the image prompt's is 0: nothing trains" if "image_prompt" in s.get("methods", ()) else ""
    lines += [
        "- mean ± std over concepts x seeds; train s is wall time of one training run (a teacher row's is that of "
        f"the run whose teacher it draws{untrained}); subject and prompt fidelity are the mini world's oracles, "
        "higher is better",
        "",
        "| method | subject fidelity | prompt fidelity | train s | s/step | runs |",
        "|:--|--:|--:|--:|--:|--:|",
    ]
    for row in summary:
        lines.append(f"| {row['label']} | {_pm(row['subject_fidelity'])} | {_pm(row['prompt_fidelity'])} | "
                     f"{_pm(row['train_seconds'], '.1f')} | {_pm(row['seconds_per_step'])} | {row['runs']} |")
    paired = [row for row in summary if row.get("reference_minus_this")]
    if paired:
        reference = METHODS[REFERENCE_METHOD].label
        lines += ["", f"Paired by concept x seed (same references, same sampling noise): {reference} (or the row "
                  "named in brackets) minus each row, mean ± standard error over the units; wins = units where the "
                  "reference's subject fidelity is higher:",
                  "", "| row | Δ subject fidelity | Δ prompt fidelity | reference wins |", "|:--|--:|--:|--:|"]
        for row in paired:
            d = row["reference_minus_this"]
            subject, prompt = d["subject_fidelity"], d["prompt_fidelity"]
            against = d.get("reference", REFERENCE_METHOD)
            label = row["label"] + (f" (against {METHODS[against].label})" if against != REFERENCE_METHOD else "")
            lines.append(f"| {label} | {subject['mean']:+.4f} ± {subject['se']:.4f} | "
                         f"{prompt['mean']:+.4f} ± {prompt['se']:.4f} | {d['reference_wins_subject']}/{d['units']} |")
    concepts = s["concepts"]
    lines += ["", "Subject fidelity per concept (mean over seeds):", "",
              "| method | " + " | ".join(concepts) + " |", "|:--|" + "--:|" * len(concepts)]
    for row in summary:
        cells = [f"{row['subject_fidelity_per_concept'][c]:.3f}" if c in row["subject_fidelity_per_concept"] else "–"
                 for c in concepts]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
