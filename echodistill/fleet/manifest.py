"""A fleet manifest: shared defaults, then one `[[concept]]` table per concept, checked as a whole.

    teacher = "miniworld/teacher"      # a checkpoint, a diffusers folder, or the shipped mini-world pair
    student = "miniworld/student"
    preset = "miniworld"               # paper | balanced | lite | miniworld (the mini world's tuned recipe)
    steps = 100
    resolution = 64
    [config]                           # TrainConfig fields for every concept
    save_every = 25

    [[concept]]
    name = "smiley"                    # the output name: out/<name>/concept.safetensors
    photos = "miniworld/smiley"        # a folder (relative to the manifest), or a mini-world subject
    token = "<v*>"
    class_word = "circle"              # optional for mini-world subjects: theirs
    captions = ["...", "..."]          # optional, one per photo ("{}" stands for "<token> <class word>")
    [concept.config]                   # this concept's TrainConfig fields
    lr_student = 3e-5

`load_manifest` reads and checks everything before anything trains and raises one ConfigError that
lists every problem (missing folders, duplicate names, unknown keys, bad values).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError, EchoDistillError, unknown_name
from ..files import check_name as check_output_name
from ..models.loading import ModelSource, resolve_dtype
from ..models.pair import check_shareable
from ..training.config import PRESETS, TrainConfig, preset
from ..training.photos import MAX_PHOTOS, MIN_PHOTOS, PhotoCountWarning, concept_image_names, load_concept_images
from .state import REPORT_NAME, STATE_NAME

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: the fleet extra installs tomli
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

MINIWORLD_PREFIX = "miniworld/"
MINIWORLD_PRESET = "miniworld"  # miniworld.recipe.PRESET (not imported here: the manifest reads without torch)
SHARED_KEYS = {"teacher", "student", "preset", "steps", "resolution", "seed", "config", "concept",
               "teacher_family", "student_family", "dtype"}
TOP_LEVEL_FIELDS = ("steps", "resolution", "seed")  # TrainConfig fields a manifest may also give at its top level
CONCEPT_KEYS = {"name", "photos", "token", "class_word", "captions", "config"}


@dataclass(frozen=True)
class ConceptJob:
    """One concept of a manifest, ready to train: where its photos are and its whole config."""

    name: str
    photos: str  # an absolute folder, or "miniworld/<subject>"
    config: TrainConfig
    captions: tuple[str | None, ...] | None = None

    @property
    def subject(self) -> str | None:
        """The mini-world subject these photos are, if they are one."""
        return self.photos[len(MINIWORLD_PREFIX):] if self.photos.startswith(MINIWORLD_PREFIX) else None


@dataclass(frozen=True)
class Manifest:
    path: Path
    teacher: str
    student: str
    concepts: tuple[ConceptJob, ...]
    teacher_family: str = "auto"
    student_family: str = "auto"
    dtype: str = "fp32"
    extra: dict = field(default_factory=dict)

    def model_paths(self) -> tuple[Path, Path]:
        return resolve_model(self.teacher, self.path.parent), resolve_model(self.student, self.path.parent)


def resolve_model(name: str, base: Path) -> Path:
    """`miniworld/teacher|student` is the shipped pair; anything else a path (relative to the manifest)."""
    from ..miniworld.architecture import shipped_model

    try:
        shipped = shipped_model(name)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if shipped is not None:
        return shipped
    path = Path(name).expanduser()
    return path if path.is_absolute() else base / path


# What the fleet itself writes in --out (fleet/state.py): no concept folder may take these names.
RESERVED_NAMES = (STATE_NAME, f"{REPORT_NAME}.md", f"{REPORT_NAME}.json")


def check_name(name: Any) -> str | None:
    """The reason an output name is refused, or None: the rule every output name follows (files.check_name)."""
    if name is not None and not isinstance(name, str):
        return f"`name` must be a string in quotes (the output folder's name), got {name!r}"
    if name is None or not name.strip():
        return "a concept needs a non-empty string `name`"
    if name in RESERVED_NAMES:
        return f"name {name!r} is the fleet's own file in --out; choose another name"
    try:
        check_output_name(name, "name")
    except ConfigError as exc:
        return str(exc)
    return None


def subject_of(photos: str):
    """The mini-world subject `photos` names ("miniworld/<subject>", procedural ones included), or None."""
    if not photos.startswith(MINIWORLD_PREFIX):
        return None
    from ..miniworld.procedural import lookup_subject

    return lookup_subject(photos[len(MINIWORLD_PREFIX):])  # ValueError for an unknown one


def load_manifest(path: str | os.PathLike) -> Manifest:
    path = Path(path).expanduser().resolve()
    if tomllib is None:  # pragma: no cover
        import sys

        raise ConfigError(f"reading a manifest on Python 3.10 needs tomli: {sys.executable} -m pip install 'tomli>=1.1'")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # -sig: Windows Notepad starts UTF-8 with a BOM
    except FileNotFoundError:
        raise ConfigError(f"manifest not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path.name} is not UTF-8 text: save the manifest as UTF-8 TOML") from None
    except IsADirectoryError:
        raise ConfigError(f"manifest {path} is a folder: give the manifest's .toml file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path.name} is not valid TOML: {exc}") from None
    return parse_manifest(data, path)


def parse_manifest(data: dict, path: Path) -> Manifest:
    """Build every concept's job; collect every problem, then raise them together."""
    problems: list[str] = []
    known = {f.name for f in fields(TrainConfig)}
    for key in sorted(set(data) - SHARED_KEYS):
        problems.append(f"{key!r} is a config field: put it under [config] (every concept) or [concept.config]"
                        if key in known else
                        f"unknown top-level key {_told(key, SHARED_KEYS)}; valid: {', '.join(sorted(SHARED_KEYS))}")
    for key in ("preset", "teacher_family", "student_family", "dtype"):
        if key in data and not isinstance(data[key], str):
            problems.append(f"`{key}` must be a string, got {data[key]!r}")
            data = {k: v for k, v in data.items() if k != key}
    if "dtype" in data:
        try:
            resolve_dtype(data["dtype"])
        except EchoDistillError as exc:
            problems.append(f"dtype: {exc}")
    preset_name = data.get("preset", "paper")
    if preset_name != MINIWORLD_PRESET and preset_name not in PRESETS:
        problems.append(f"preset {preset_name!r} is unknown; valid: {', '.join([*PRESETS, MINIWORLD_PRESET])}")
        preset_name = "paper"  # reported once here; each concept's fields are still checked against the paper's
    shared = _table(data.get("config", {}), "[config]", problems)
    problems += [f"[config]: unknown config key {_told(k, known)}" for k in sorted(set(shared) - known)]
    for key in TOP_LEVEL_FIELDS:
        if key in data and key in shared and shared[key] != data[key]:
            problems.append(f"top-level `{key} = {data[key]!r}` and [config] `{key} = {shared[key]!r}`: two values for "
                            f"{key}; give it once")
        elif key in data:
            shared[key] = data[key]
    line, sources = "sd", {}
    for role in ("teacher", "student"):
        value = data.get(role)
        if value is None or (isinstance(value, str) and not value.strip()):
            problems.append(f"`{role}` is missing: a checkpoint, a diffusers folder or miniworld/{role}")
            continue
        if not isinstance(value, str):
            problems.append(f"`{role}` must be a path string in quotes (a checkpoint, a diffusers folder or "
                            f"miniworld/{role}), got {value!r}")
            continue
        try:
            model = resolve_model(data[role], path.parent)
        except ConfigError as exc:
            problems.append(f"{role}: {exc}")
            continue
        if not model.exists():
            problems.append(f"{role}: {model} does not exist")
        else:
            try:
                source = ModelSource.open(model, data.get(f"{role}_family", "auto"), role=role)
                source.check_files(role)  # damaged weights and configs refused here, not on every worker
                sources[role] = source
            except EchoDistillError as exc:
                problems.append(f"{role}: {exc}")
    if len(sources) == 2:
        try:  # as load_model_pair checks it: one set of text encoders must serve both
            check_shareable(sources["teacher"], sources["student"])
        except EchoDistillError as exc:
            problems.append(str(exc))
    if "teacher" in sources:
        line = "sdxl" if sources["teacher"].config.is_sdxl else "sd"

    faults = _check_shared_config(data, shared, known, preset_name, line, problems)

    entries = data.get("concept", [])
    if isinstance(entries, dict):  # `[concept]` (one table) where `[[concept]]` (an array of tables) was meant
        problems.append("`concept` is a single table: write each concept as [[concept]] (two brackets), not "
                        "[concept]")
        entries = []
    elif not isinstance(entries, list):
        problems.append(f"`concept` must be [[concept]] tables, got {entries!r}")
        entries = []
    elif not entries:
        problems.append("the manifest lists no concepts: add [[concept]] tables")
    jobs, seen = [], {}
    for index, entry in enumerate(entries, 1):
        where = f"concept #{index}"
        if not isinstance(entry, dict):
            problems.append(f"{where} is not a table")
            continue
        name_problem = check_name(entry.get("name"))
        if name_problem:
            problems.append(f"{where}: {name_problem}")
        else:
            where = f"concept {entry['name']!r}"
            if entry["name"] in seen:
                problems.append(f"{where}: duplicate output name (also concept #{seen[entry['name']]})")
            seen.setdefault(entry["name"], index)
        job = _concept_job(entry, where, shared, preset_name, known, path.parent, problems, line, faults)
        if job is not None and not name_problem:
            jobs.append(job)
    if problems:
        raise ConfigError(f"{path.name}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    return Manifest(path=path, teacher=data["teacher"], student=data["student"], concepts=tuple(jobs),
                    teacher_family=data.get("teacher_family", "auto"),
                    student_family=data.get("student_family", "auto"), dtype=data.get("dtype", "fp32"))


def config_problems(exc: Exception) -> list[str]:
    """TrainConfig's problems one by one: it raises one, or one error listing several ("N config problems:" and
    a "  - problem" line each); a manifest lists each on its own line, naming where it comes from."""
    head, _, rest = str(exc).partition("\n")
    if rest and head.endswith("config problems:"):
        return [line.strip().removeprefix("- ") for line in rest.splitlines() if line.strip()]
    return [str(exc)]


def _field_of(problem: str) -> str | None:
    """The field a TrainConfig problem names first ("steps=0 must be at least 1": steps), if any."""
    match = re.match(r"(\w+)=", problem)
    return match.group(1) if match else None


def _shared_where(problem: str, data: dict, config: dict) -> str:
    """Where a problem of the shared config comes from: a top-level key, [config], or their combination."""
    name = _field_of(problem)
    if name in TOP_LEVEL_FIELDS and name in data:
        return f"top-level `{name}` (every concept's)"
    if name is not None and isinstance(config, dict) and name in config:
        return "[config]"
    return "the shared settings (top-level keys and [config])"


def _check_shared_config(data: dict, shared: dict, known: set[str], preset_name: str, line: str,
                         problems: list[str]) -> tuple[set[str], set[str]]:
    """Check the shared values (top-level steps / resolution / seed and [config]) once, on their own, whatever the
    concepts are: each problem is listed once, naming the shared key, not once per concept. Returns the fields at
    fault (each concept is then checked without them) and the problems' texts (not repeated for any concept)."""
    changes = {k: v for k, v in shared.items() if k in known}
    changes.setdefault("class_word", "object")  # each concept's own; a stand-in to check the rest
    with warnings.catch_warnings():  # a warning about the shared values is each concept's to give
        warnings.simplefilter("ignore")
        _, texts, faulty = checked_config(preset_name, changes, line)
    problems += [f"{_shared_where(text, data, data.get('config'))}: {text}" for text in texts]
    return faulty, set(texts)


def photo_problems(manifest: Manifest) -> list[str]:
    """Every concept's photos read as its worker will read them (decoded, upright, at least half the training
    resolution): a truncated file or a thumbnail fails here, before a long run, not on a worker. One line per
    concept whose photos fail; mini-world subjects are drawn, not read, and need no check. Seconds per hundred
    photos, so `fleet run --check` does it and a plain run does not."""
    problems = []
    for job in manifest.concepts:
        if job.subject is None:
            try:
                load_concept_images(job.photos, captions=job.captions, resolution=job.config.resolution)
            except EchoDistillError as exc:
                problems.append(f"concept {job.name!r}: {exc}")
    return problems


def checked_config(preset_name: str, changes: dict, line: str = "sd") -> tuple[TrainConfig | None, list[str], set[str]]:
    """(the config or None, every problem of `changes`, the fields at fault). Fields of an unknown name or of the
    wrong type are set aside and the rest checked again, so no bad value hides another's problem."""
    texts: list[str] = []
    faulty: set[str] = set()
    while True:
        try:
            config = build_config(preset_name, changes, line)
        except (ConfigError, TypeError) as exc:
            new_texts = [text for text in config_problems(exc) if text not in texts]
            new_fields = set(getattr(exc, "parameters", ())) - faulty
            texts += new_texts
            faulty |= new_fields
            if not new_texts or not new_fields:
                return None, texts, faulty
            changes = {k: v for k, v in changes.items() if k not in new_fields}
            changes.setdefault("class_word", "object")  # build_config needs one: a stand-in
            continue
        return (None if texts else config), texts, faulty


def _told(key: str, valid) -> str:
    """'stepz' (did you mean steps?): an unknown key with the valid one it may misspell."""
    return unknown_name(key, sorted(valid), shown=repr(key))


def _table(value, where: str, problems: list[str]) -> dict:
    if not isinstance(value, dict):
        problems.append(f"{where} must be a table of config fields")
        return {}
    return dict(value)


def _concept_job(entry: dict, where: str, shared: dict, preset_name: str, known: set[str], base: Path,
                 problems: list[str], line: str = "sd",
                 faults: tuple[set[str], set[str]] = (set(), set())) -> ConceptJob | None:
    """One concept's job, or None with its problems added. `faults`: the shared fields at fault and their
    problems' texts (listed once already, by _check_shared_config): this concept is checked without them."""
    count = len(problems)
    problems += [f"{where}: {k!r} is a config field: put it under [concept.config] (or [config], for every concept)"
                 if k in known else
                 f"{where}: unknown key {_told(k, CONCEPT_KEYS)}; valid: {', '.join(sorted(CONCEPT_KEYS))}"
                 for k in sorted(set(entry) - CONCEPT_KEYS)]
    own = _table(entry.get("config", {}), f"{where} [concept.config]", problems)
    problems += [f"{where}: unknown config key {_told(k, known)}" for k in sorted(set(own) - known)]
    photos = entry.get("photos")
    subject, photo_count = None, None
    if photos is not None and not isinstance(photos, str):
        problems.append(f"{where}: `photos` must be a path string in quotes (a folder of photos or "
                        f"miniworld/<subject>), got {photos!r}")
    elif not photos or not photos.strip():
        problems.append(f"{where}: `photos` is missing: a folder of photos or miniworld/<subject>")
    elif photos.startswith(MINIWORLD_PREFIX):
        try:
            subject = subject_of(photos)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    else:
        folder = Path(photos).expanduser()
        folder = folder if folder.is_absolute() else base / folder
        if not folder.is_dir():
            problems.append(f"{where}: photos folder {folder} does not exist")
        else:
            try:  # a folder without a usable photo is refused here, not later on a worker
                photo_count = len(concept_image_names(folder))
            except DataError as exc:
                problems.append(f"{where}: {exc}")
        photos = str(folder)
    # the concept's own, else a mini-world subject's (more specific than a shared one), else the shared [config]'s
    class_word = entry.get("class_word", subject.class_word if subject is not None else shared.get("class_word"))
    if class_word is None and not (isinstance(photos, str) and photos.startswith(MINIWORLD_PREFIX)):
        problems.append(f"{where}: `class_word` is missing (the subject's class, e.g. 'dog')")
    references = None
    if subject is not None:
        from ..miniworld import reference_captions

        references = reference_captions(subject)  # one per drawn reference, in the world's grammar
    captions = entry.get("captions")
    if captions is not None and not (isinstance(captions, list) and all(isinstance(c, str) for c in captions)):
        problems.append(f"{where}: `captions` must be a list of strings, one per photo")
    elif photo_count is not None and photo_count < MIN_PHOTOS:
        problems.append(f"{where}: {photos} holds {photo_count} photo(s), but a concept is learned from {MIN_PHOTOS} to "
                        f"{MAX_PHOTOS}: add at least {MIN_PHOTOS - photo_count} more")
    elif photo_count is not None and photo_count > MAX_PHOTOS:  # as train warns: all are used
        warnings.warn(f"{where}: {photos} holds {photo_count} photos, more than the {MIN_PHOTOS}-{MAX_PHOTOS} the "
                      f"method is made for; training uses all {photo_count}", PhotoCountWarning, stacklevel=2)
    elif captions is not None and photo_count is not None and len(captions) != photo_count:
        problems.append(f"{where}: `captions` lists {len(captions)} caption(s) for {photo_count} photo(s) in "
                        f"{photos}: give one per photo, in file-name order")
    elif captions is not None and references is not None and len(captions) != len(references):
        problems.append(f"{where}: `captions` lists {len(captions)} caption(s) for the {len(references)} references "
                        f"of mini-world subject {photos!r}: give one per reference, or leave `captions` out for the "
                        "world's own grammar captions")
    if references is not None and captions is None:
        captions = references  # the world's grammar: what its text encoder learned
    failed = len(problems) > count
    bad_shared, shared_texts = faults
    changes = {**{k: v for k, v in shared.items() if k in known and k not in bad_shared},
               **{k: v for k, v in own.items() if k in known}}
    # A missing class word is reported above; a stand-in lets the config's own problems be listed with it.
    changes["class_word"] = class_word if class_word is not None else "object"
    if "token" in entry:
        changes["token"] = entry["token"]
    config, texts, _ = checked_config(preset_name, changes, line)
    own_fields = set(own) | (set(entry) & {"token", "class_word"})
    problems += [f"{where}: {text}" for text in texts  # a shared value's problem is listed once, as the shared key's
                 if text not in shared_texts or _field_of(text) in own_fields]
    if config is None or bad_shared or shared_texts:  # or the shared values it takes are not (listed once)
        return None
    if failed or check_name(entry.get("name")) is not None:  # a bad or missing name is reported by the caller
        return None
    return ConceptJob(name=entry["name"], photos=photos, config=config,
                      captions=None if captions is None else tuple(captions))


def build_config(preset_name: str, changes: dict, line: str = "sd") -> TrainConfig:
    """A preset as `line` has it (SDXL's lite trains LoRA K/V) with `changes`, validated by TrainConfig itself;
    lists become tuples as TOML has no tuple."""
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
    if preset_name == MINIWORLD_PRESET:
        from ..miniworld.recipe import preset_config

        return preset_config(changes, default_steps=100)
    return preset(preset_name, line=line, **changes)
