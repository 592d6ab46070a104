"""What a fleet leaves under `--out`, and how `fleet status` and `fleet report` read it.

    out/fleet-state.json          every concept's state, written by the driver alone (atomically)
    out/<name>/concept.safetensors   the finished bundle
    out/<name>/checkpoint.pt      the last checkpoint (a lost worker's successor resumes from it)
    out/<name>/progress.json      the step the worker training it is at (written by that worker)
    out/fleet-report.md|json      `fleet report`
    out/fleet-metrics.json        `fleet report --metrics`: the oracles' scores, each with the bundle file it scored

States: queued -> training (step k of n) -> done | failed; on a second run a finished bundle is
`verifying` until a worker has loaded it and checked it against its base models, then `skipped` (or
queued again, with a `note` saying why).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..models.tensor_files import atomic_write_text

STATE_NAME = "fleet-state.json"
PROGRESS_NAME = "progress.json"
REPORT_NAME = "fleet-report"
METRICS_NAME = "fleet-metrics.json"
FINISHED = ("done", "skipped")
METRIC_COLUMNS = ("subject_fidelity", "prompt_fidelity", "metrics_error")
COLUMNS = ("concept", "status", "steps", "wall_s", "attempts", "worker", "bundle", *METRIC_COLUMNS[:2], "error",
           "note", METRIC_COLUMNS[2])


def bundle_identity(path: str) -> dict | None:
    """What says a bundle file is still the one scored: its absolute path, size and modification time (None:
    no such file)."""
    try:
        stat = Path(path).stat()
    except (OSError, ValueError):
        return None
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def read_metrics(out: str | Path) -> dict[str, dict]:
    """out/fleet-metrics.json ({} when there is none, or it cannot be read: the report then shows no scores)."""
    try:
        scores = json.loads((Path(out) / METRICS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(scores, dict):
        return {}
    return {name: entry for name, entry in scores.items() if isinstance(entry, dict) and _well_formed(entry)}


def _well_formed(entry: dict) -> bool:
    """Scores are finite numbers and a reason is text, or the entry is not shown (a file edited by hand)."""
    scores = [entry.get(column) for column in METRIC_COLUMNS[:2] if entry.get(column) is not None]
    reason = entry.get(METRIC_COLUMNS[2])
    return (all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in scores)
            and (reason is None or isinstance(reason, str)))


class FleetState:
    """The per-concept records of one `--out` folder; only the driver writes it."""

    def __init__(self, out: str | Path, concepts: dict[str, dict] | None = None, manifest: str = ""):
        self.out, self.concepts, self.manifest = Path(out), concepts or {}, manifest

    @property
    def path(self) -> Path:
        return self.out / STATE_NAME

    @classmethod
    def load(cls, out: str | Path) -> "FleetState":
        path = Path(out) / STATE_NAME
        if not path.is_file():
            from ..errors import EchoDistillError

            raise EchoDistillError(f"no fleet state in {out}: run `echodistill fleet run MANIFEST --out {out}` first")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            concepts, manifest = data.get("concepts", {}), data.get("manifest", "")
            if not isinstance(concepts, dict) or not all(isinstance(r, dict) for r in concepts.values()):
                raise ValueError("its concepts are not one record per concept")
        except (ValueError, AttributeError) as error:
            from ..errors import EchoDistillError

            raise EchoDistillError(f"{path} is not a fleet state file ({error}); run the manifest again with "
                                   f"`echodistill fleet run MANIFEST --out {out}` to rebuild it") from None
        return cls(out, concepts, manifest)

    @classmethod
    def load_or_new(cls, out: str | Path, manifest: str) -> "FleetState":
        try:
            state = cls.load(out)
        except Exception:
            return cls(out, {}, manifest)
        state.manifest = manifest
        return state

    def update(self, name: str, **fields) -> dict:
        record = self.concepts.setdefault(name, {"concept": name})
        record.update(fields)
        return record

    def save(self) -> Path:
        payload = {"manifest": self.manifest, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "concepts": self.concepts}
        return atomic_write_text(self.path, json.dumps(payload, indent=2, sort_keys=True) + "\n")

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.concepts.values():
            counts[record.get("status", "?")] = counts.get(record.get("status", "?"), 0) + 1
        return counts

    # --- what the commands print and write --------------------------------------------------
    def status_lines(self) -> list[str]:
        lines = []
        for name, record in sorted(self.concepts.items()):
            status = record.get("status", "?")
            if status == "training":
                status = f"training step {record.get('step', 0)}/{record.get('steps', '?')}"
            detail = record.get("error") or record.get("bundle") or ""
            lines.append(f"{name:<24} {status:<24} {detail}")
        summary = ", ".join(f"{n} {s}" for s, n in sorted(self.counts().items()))
        return lines + [f"{len(self.concepts)} concepts: {summary}"]

    def rows(self) -> list[dict]:
        """One row per concept; the scores of fleet-metrics.json where they are of the bundle the record names now
        (a concept trained again since, or not finished, shows none)."""
        scores = read_metrics(self.out)

        def metrics(name: str, record: dict) -> dict:
            entry, bundle = scores.get(name, {}), record.get("bundle")
            current = (record.get("status") in FINISHED and name in scores  # a missing file's reason is current too
                       and entry.get("bundle") == (bundle_identity(bundle) if isinstance(bundle, str) else None))
            return {column: entry.get(column) if current else None for column in METRIC_COLUMNS}

        return [{column: record.get(column, record.get("step") if column == "steps" else None)
                 for column in COLUMNS} | metrics(name, record) | {"concept": name}
                for name, record in sorted(self.concepts.items())]

    def write_report(self) -> tuple[Path, Path]:
        rows = self.rows()
        json_path = atomic_write_text(self.out / f"{REPORT_NAME}.json", json.dumps(rows, indent=2) + "\n")
        header = "| " + " | ".join(COLUMNS) + " |\n|" + "|".join(":--" for _ in COLUMNS) + "|\n"
        body = "".join("| " + " | ".join(_cell(row[c], c) for c in COLUMNS) + " |\n" for row in rows)
        markdown = f"# Fleet report: {self.manifest or self.out}\n\n{header}{body}"
        return atomic_write_text(self.out / f"{REPORT_NAME}.md", markdown), json_path


def _cell(value, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}" if column == "wall_s" else f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def read_progress(run_dir: Path) -> dict | None:
    """A worker's last progress note for a concept (None if none yet or half written)."""
    try:
        return json.loads((run_dir / PROGRESS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
