"""Where the pack's files live in ComfyUI, and names that cannot escape those folders.

`models/echodistill/` (registered with folder_paths, so extra_model_paths.yaml can move it):
    diffusers/<name>/   teacher/student models as diffusers folders
    configs/<name>/     config folders for checkpoints of other shapes (like the shipped families)
    concepts/*.safetensors   saved concept bundles
    backbones/<name>    discriminator / metric backbones (DINO, DINOv2, CLIP folders or files)
    runs/<key>/         training checkpoints and previews
Shipped with the pack: the mini world's teacher and student (`miniworld/teacher|student` in the
model lists), its held-out subjects' references (`miniworld/<subject>` in the photo folders) and a
concept trained on them (`miniworld/<subject>.safetensors` in Load Concept).
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths
from PIL import Image

KIND = "echodistill"
NONE = "none"
DIFFUSERS_PREFIX = "diffusers/"


def register() -> None:
    default = os.path.join(folder_paths.models_dir, KIND)
    if KIND not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(KIND, default, is_default=True)


def roots() -> list[Path]:
    return [Path(p) for p in folder_paths.get_folder_paths(KIND)]


def safe_join(base: Path, name: str) -> Path:
    """base/name, refusing absolute names, '..' and links that lead outside base."""
    if not name or os.path.isabs(name) or ".." in Path(name).parts or "\\" in name:
        raise ValueError(f"{name!r} is not a name inside {base}: use a plain name such as 'my_dog'")
    path = base / name
    if os.path.commonpath([os.path.realpath(base), os.path.realpath(path)]) != os.path.realpath(base):
        raise ValueError(f"{name!r} leads outside {base}")
    return path


def check_name(name: str) -> str | bool:
    """For validate_inputs of a name the pack writes: True, or why it is refused (the library's one name rule)."""
    from echodistill.errors import ConfigError
    from echodistill.files import check_name as library_check_name

    try:
        library_check_name(name)
    except ConfigError as error:
        return str(error)
    return True


def check_existing(name: str) -> str | bool:
    """For validate_inputs of a file chosen from a list: True, or why it is refused (it leaves the folder)."""
    try:
        safe_join(Path("/"), name)
    except ValueError as error:
        return str(error)
    return True


def _subdirs(sub: str, marker: str | None = None) -> list[str]:
    names = set()
    for root in roots():
        folder = root / sub
        if folder.is_dir():
            for child in folder.iterdir():
                if child.is_dir() and (marker is None or (child / marker).is_file()):
                    names.add(child.name)
                elif child.is_file() and marker is None and child.suffix == ".safetensors":
                    names.add(child.name)
    return sorted(names)


def find(sub: str, name: str) -> Path:
    """The first existing roots()/sub/name, safely."""
    for root in roots():
        path = safe_join(root / sub, name)
        if path.exists():
            return path
    raise FileNotFoundError(f"{name!r} is not in any {KIND}/{sub} folder ({', '.join(str(r / sub) for r in roots())})")


def writable(sub: str) -> Path:
    """roots()[0]/sub, created and probed for writing (a clear error names it and the cause)."""
    from echodistill.files import check_writable

    return check_writable(roots()[0] / sub, f"{KIND}/{sub} folder")


SHIPPED_PREFIX = "miniworld/"


def _shipped_models() -> dict[str, Path]:
    """The mini-world teacher and student that ship inside the pack (runnable with no downloads)."""
    from echodistill.miniworld.architecture import SHIPPED_MODELS

    return {name: p for name, p in SHIPPED_MODELS.items() if (p / "unet" / "config.json").is_file()}


def model_choices() -> list[str]:
    """Single-file checkpoints from ComfyUI's list, our diffusers folders, then the shipped mini-world pair."""
    return (folder_paths.get_filename_list("checkpoints")
            + [DIFFUSERS_PREFIX + n for n in _subdirs("diffusers", "unet/config.json")]
            + list(_shipped_models()))


def resolve_model(choice: str) -> Path:
    if choice.startswith(DIFFUSERS_PREFIX):
        return find("diffusers", choice[len(DIFFUSERS_PREFIX):])
    if choice.startswith(SHIPPED_PREFIX):
        shipped = _shipped_models()
        if choice not in shipped:
            raise FileNotFoundError(f"{choice!r} is not shipped with this pack; shipped: {', '.join(shipped) or 'none'}")
        return shipped[choice]
    return Path(folder_paths.get_full_path_or_raise("checkpoints", choice))


CONFIGS_PREFIX = "configs/"


def family_choices(shipped) -> list[str]:
    """auto, the shipped families, then config folders users add in models/echodistill/configs."""
    return ["auto", *shipped, *(CONFIGS_PREFIX + n for n in _subdirs("configs", "unet/config.json"))]


def resolve_family(choice: str) -> str | Path:
    return find("configs", choice[len(CONFIGS_PREFIX):]) if choice.startswith(CONFIGS_PREFIX) else choice


def _shipped_concepts() -> dict[str, Path]:
    """Concept bundles trained on the shipped mini-world pair (`miniworld/<subject>.safetensors`)."""
    from echodistill.miniworld import SHIPPED_CONCEPT_DIR

    if not SHIPPED_CONCEPT_DIR.is_dir():
        return {}
    return {f"{SHIPPED_PREFIX}{p.name}": p for p in sorted(SHIPPED_CONCEPT_DIR.glob("*.safetensors"))}


def concept_choices() -> list[str]:
    """Saved concepts in models/echodistill/concepts, then the ones shipped with the pack."""
    return [n for n in _subdirs("concepts") if n.endswith(".safetensors")] + list(_shipped_concepts())


def find_concept(name: str) -> Path:
    """A saved concept by file name, or a shipped one (`miniworld/<subject>.safetensors`)."""
    shipped = _shipped_concepts()
    if name in shipped:
        return shipped[name]
    try:
        return find("concepts", name)
    except FileNotFoundError as missing:
        raise FileNotFoundError(f"{missing} Save one with Save Concept (e.g. the train-and-sample workflow), "
                                f"or pick a shipped one: {', '.join(shipped) or 'none'}") from None


def backbone_choices() -> list[str]:
    return [NONE] + _subdirs("backbones")


FRESH_SUBJECTS_LISTED = 3  # procedural subjects offered in the list; any miniworld/procedural_<seed> is accepted


def shipped_subject_names() -> list[str]:
    """miniworld/<subject> for the six held-out subjects, then a few fresh procedural ones (never trained on)."""
    from echodistill.miniworld.concepts import CONCEPTS
    from echodistill.miniworld.procedural import VALIDATION_SEEDS, procedural_name

    fresh = [procedural_name(seed) for seed in VALIDATION_SEEDS.seeds()[:FRESH_SUBJECTS_LISTED]]
    return [f"{SHIPPED_PREFIX}{name}" for name in [*sorted(CONCEPTS), *fresh]]


def shipped_references(name: str) -> tuple[list[Image.Image], list[str]] | None:
    """(pictures, captions) of miniworld/<subject> (a held-out subject or procedural_<seed>), None for any other
    name; ValueError for an unknown subject. The command line reads the same names the same way."""
    from echodistill.miniworld.procedural import subject_references

    return subject_references(name)


def input_folder_choices() -> list[str]:
    """Folders inside ComfyUI's input directory, then the shipped mini-world subjects."""
    base = Path(folder_paths.get_input_directory())
    found = sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_dir()) if base.is_dir() else []
    return found + shipped_subject_names()
