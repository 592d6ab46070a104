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
from typing import Callable

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
    """For validate_inputs: True, or the reason the name is refused."""
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
    folder = roots()[0] / sub
    folder.mkdir(parents=True, exist_ok=True)
    return folder


SHIPPED_PREFIX = "miniworld/"


def _shipped_models() -> dict[str, Path]:
    """The mini-world teacher and student that ship inside the pack (runnable with no downloads)."""
    from echodistill.miniworld import STUDENT_DIR, TEACHER_DIR

    return {f"{SHIPPED_PREFIX}{p.name}": p for p in (TEACHER_DIR, STUDENT_DIR) if (p / "unet" / "config.json").is_file()}


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


def shipped_concept_references() -> dict[str, Callable[[], tuple[list[Image.Image], list[str]]]]:
    """The mini world's held-out subjects as read-only "folders" of (reference pictures, their captions in the
    world's grammar), drawn rather than stored."""
    from echodistill.miniworld import CONCEPTS, reference_captions, reference_images

    def drawer(concept):
        return lambda: ([Image.fromarray(array) for array in reference_images(concept)], reference_captions(concept))

    return {f"{SHIPPED_PREFIX}{name}": drawer(concept) for name, concept in sorted(CONCEPTS.items())}


def input_folder_choices() -> list[str]:
    """Folders inside ComfyUI's input directory, then the shipped mini-world subjects."""
    base = Path(folder_paths.get_input_directory())
    found = sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_dir()) if base.is_dir() else []
    return found + list(shipped_concept_references())
