"""Reference photos: read them upright as 8-bit RGB, with optional captions, or say exactly which fail.

    load_concept_images(folder | paths | PIL images)  ->  ConceptPhotos (a list of ConceptImage)

The one loader of every command and node that reads photos (train, eval, the nodes): the same
clear errors everywhere, and every file of a folder is either used or named with the reason it
was not (``ConceptPhotos.skipped``, ``ConceptPhotos.report()``).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from echodistill.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# How many photos a concept is learned from: the method's "a few (3-20) photos of a subject" (DESIGN.md section 1).
# Fewer cannot separate the subject from one photo's pose and background; more is allowed, with a warning.
MIN_PHOTOS, MAX_PHOTOS = 3, 20


# EXIF orientation (tag 0x0112) -> the transpose that makes the picture upright.
_ORIENTATION_TAG = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

ImageInput = Union[str, os.PathLike, Image.Image]


@dataclass
class ConceptImage:
    """One reference photo, upright and 8-bit RGB, with its optional caption."""

    image: Image.Image
    caption: str | None
    name: str
    text: dict[str, str] = field(default_factory=dict)  # the file's text chunks (PNG tEXt/iTXt), e.g. our prompts


class ConceptPhotos(list):
    """The photos read (a list of ConceptImage), and the files of the folder that were not used."""

    def __init__(self, images=(), skipped: Sequence[tuple[str, str]] = ()):
        super().__init__(images)
        self.skipped: list[tuple[str, str]] = list(skipped)  # (file name, why it was not used)

    def report(self, noun: str = "photo") -> str:
        """One line naming what was used (as `noun`s: "picture" for generated ones), and one naming each file
        skipped with its reason."""
        lines = [f"{len(self)} {noun}(s) used: {', '.join(item.name for item in self)}"]
        if self.skipped:
            lines.append(f"{len(self.skipped)} file(s) not used: "
                         + "; ".join(f"{name} ({why})" for name, why in self.skipped))
        return "\n".join(lines)


# Why a file beside the photos is not read, by extension; anything else gets the generic reason.
_SKIP_REASONS = {
    ".gif": "GIF is not read as a photo (animation frames, 256-colour palette): save it as PNG or JPEG to use it",
    ".heic": "HEIC is not read: export it as JPEG",
    ".heif": "HEIF is not read: export it as JPEG",
    ".avif": "AVIF is not read: save it as PNG or JPEG",
    ".svg": "SVG is a drawing, not a photo: save it as PNG",
}
_SIDECAR_EXTENSIONS = (".txt",)  # captions, read beside their photo


# --------------------------------------------------------------------------- loading


def load_concept_images(
    source: str | os.PathLike | Sequence[ImageInput],
    *,
    captions: Sequence[str | None] | Mapping[str, str | None] | None = None,
    resolution: int = 512,
    min_size_fraction: float = 0.5,
) -> list[ConceptImage]:
    """Read the reference photos of a concept.

    ``source`` is a folder (its image files sorted by name; hidden files and other
    extensions skipped), one image file, or a list of paths and/or PIL images.
    Captions: ``<stem>.txt`` (or ``<file name>.txt``) next to an image file is its caption;
    ``captions`` overrides those, either as a list aligned with the images found (``None``
    entries keep the sidecar) or as a dict keyed by file name or stem.
    Every bad file is collected first, then one DataError lists them all.
    """
    if resolution <= 0 or min_size_fraction < 0:
        raise ConfigError(
            f"resolution={resolution} and min_size_fraction={min_size_fraction} must be "
            "positive and non-negative"
        )
    entries, skipped = _list_entries(source)
    names = [name for name, _, _ in entries]
    read = [_read_sidecar(item) if not isinstance(item, Image.Image) else (None, None) for _, _, item in entries]
    merged = _merge_captions(names, [caption for caption, _ in read], captions)
    in_folder = isinstance(source, (str, os.PathLike)) and Path(source).expanduser().is_dir()
    # an empty caption file was surely meant to hold one: say so, rather than train on the templates in silence
    empty = [file.name if in_folder else str(file)
             for (caption, file), final in zip(read, merged) if file is not None and caption is None and final is None]
    if empty:
        warnings.warn(f"{len(empty)} caption file(s){_where(source)} are empty, so their photos train with the "
                      f"prompt templates instead: {', '.join(empty)}; write a caption in each (e.g. 'a photo of {{}} "
                      "on the grass') or delete them", EmptyCaptionWarning, stacklevel=2)

    min_side = math.ceil(min_size_fraction * resolution)
    images: list[ConceptImage] = []
    unreadable: list[str] = []
    too_small: list[str] = []
    for (name, label, item), caption in zip(entries, merged):
        try:
            image = _read_rgb(item)
        except _READ_ERRORS as err:
            unreadable.append(f"{label} ({_reason(err)})")
            continue
        if min(image.size) < min_side:
            too_small.append(f"{label} ({image.width}x{image.height})")
        images.append(ConceptImage(image=image, caption=caption, name=name, text=_text_chunks(item)))

    where = _where(source)
    problems = []
    if unreadable:
        problems.append(
            f"{len(unreadable)} file(s){where} could not be read as images: "
            f"{', '.join(unreadable)}. "
            "Re-save them as JPEG or PNG, or remove them."
        )
    if too_small:
        problems.append(
            f"{len(too_small)} image(s){where} have a shorter side below {min_side} px "
            f"({min_size_fraction:g} of the {resolution}-px training resolution: smaller ones would be upscaled into "
            f"blur): {', '.join(too_small)}. Use larger photos, remove these, or train at a lower resolution."
        )
    if problems:
        raise DataError("\n".join(problems))
    return ConceptPhotos(images, skipped)


def _where(source) -> str:
    """" in '<folder>'" for a folder source (how messages say where their files are), else ""."""
    if isinstance(source, (str, os.PathLike)) and Path(source).expanduser().is_dir():
        return f" in {str(Path(source).expanduser())!r}"
    return ""


class EmptyCaptionWarning(UserWarning):
    """A photo's caption file holds no text: the photo trains with the prompt templates, as one without."""


class PhotoCountWarning(UserWarning):
    """More photos than the method is made for (MAX_PHOTOS): all of them are used."""


def check_photo_count(photos: Sequence[ConceptImage], where: str) -> None:
    """Check that a concept has the photos training needs: at least MIN_PHOTOS, else DataError naming `where`
    (how the caller names the source, e.g. "--images photos/dog"), the count, the photos and the files of the
    folder that were not read; above MAX_PHOTOS a PhotoCountWarning says that all of them are used.
    The mini world's subjects have 5 references each."""
    count = len(photos)
    if count < MIN_PHOTOS:
        names = f" ({', '.join(item.name for item in photos)})" if photos else ""
        skipped = getattr(photos, "skipped", [])
        unread = (f"; {len(skipped)} other file(s) there are not read as photos: "
                  + ", ".join(name for name, _ in skipped)) if skipped else ""
        raise DataError(f"{where}: {count} photo(s){names}, but a concept is learned from {MIN_PHOTOS} to "
                        f"{MAX_PHOTOS} photos of the subject: add at least {MIN_PHOTOS - count} more (other "
                        f"angles, backgrounds, lighting){unread}")
    if count > MAX_PHOTOS:
        warnings.warn(f"{where}: {count} photos, more than the {MIN_PHOTOS}-{MAX_PHOTOS} the method is made for; "
                      f"training uses all {count} (each is drawn less often in the same steps); keep the "
                      f"{MAX_PHOTOS} most varied to stay within it", PhotoCountWarning, stacklevel=2)


def concept_image_names(source: str | os.PathLike) -> list[str]:
    """The file names load_concept_images reads from the folder (or file) `source`, in training order,
    without decoding them: a cheap check before a long job. Raises DataError as load_concept_images
    does for a missing folder or one without a usable image file."""
    return [name for name, _, _ in _list_entries(source)[0]]


def _skip_reason(path: Path) -> str:
    if path.is_symlink() and not path.exists():  # exists() follows the link: a dangling one or a loop
        return "a broken symbolic link (its target is missing, or links back to itself)"
    if path.is_dir():
        return "a folder: photos in subfolders are not read"
    suffix = path.suffix.lower()
    return _SKIP_REASONS.get(suffix, f"{suffix or 'no extension'} is not a photo format read here "
                                     f"(use {', '.join(IMAGE_EXTENSIONS)})")


def _text_chunks(item) -> dict[str, str]:
    try:
        if isinstance(item, Image.Image):
            info = item.info
        else:
            with Image.open(item) as image:
                info = dict(image.info)
    except _READ_ERRORS:
        return {}
    return {k: v for k, v in info.items() if isinstance(k, str) and isinstance(v, str)}


def _list_entries(source) -> tuple[list[tuple[str, str, Path | Image.Image]], list[tuple[str, str]]]:
    """(name, label for messages, path or PIL image) per input, in training order; and the
    (name, reason) of every other non-hidden entry of a folder (caption files aside)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_file():
            return [(path.name, str(path), path)], []
        if not path.is_dir():
            raise DataError(f"concept image folder {str(path)!r} does not exist; check the path")
        try:
            entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        except OSError as err:
            raise DataError(f"cannot list the image folder {str(path)!r}: {_reason(err)}") from None
        chosen = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        skipped = [(p.name, _skip_reason(p)) for p in entries
                   if p not in chosen and not (p.is_file() and p.suffix.lower() in _SIDECAR_EXTENSIONS)]
        if not chosen:
            found = f" (found only: {'; '.join(f'{n} ({why})' for n, why in skipped[:10])})" if skipped else ""
            raise DataError(
                f"no usable image in folder {str(path)!r}{found}; put the concept photos there "
                f"as {', '.join(IMAGE_EXTENSIONS)} files"
            )
        return [(p.name, p.name, p) for p in chosen], skipped
    if isinstance(source, Image.Image) or not isinstance(source, Sequence):
        raise DataError(
            f"concept images must be a folder path or a list of paths / PIL images, "
            f"not {type(source).__name__}"
        )
    if len(source) == 0:
        raise DataError("no concept images were given; pass a folder or a list of 3-20 photos")
    entries: list[tuple[str, str, Path | Image.Image]] = []
    for i, item in enumerate(source):
        if isinstance(item, Image.Image):
            filename = getattr(item, "filename", "") or ""
            name = Path(filename).name if filename else f"image_{i:03d}"
            entries.append((name, f"image #{i} ({name})", item))
        elif isinstance(item, (str, os.PathLike)):
            path = Path(item).expanduser()
            entries.append((path.name, str(path), path))
        else:
            raise DataError(
                f"item #{i} of the concept image list is a {type(item).__name__}; "
                "give file paths or PIL images"
            )
    return entries, []


def _read_sidecar(path: Path) -> tuple[str | None, Path | None]:
    """(the caption of the photo at `path`, None where it has none or an empty one; its caption file or None)."""
    for candidate in (path.with_suffix(".txt"), path.with_name(path.name + ".txt")):
        if candidate.is_file():
            try:
                return _clean_caption(candidate.read_text(encoding="utf-8-sig"), candidate.name), candidate
            except UnicodeDecodeError:
                raise DataError(
                    f"caption file {str(candidate)!r} is not UTF-8 text; save it as UTF-8"
                ) from None
    return None, None


def _merge_captions(names: list[str], sidecars: list[str | None], captions) -> list[str | None]:
    """Sidecar captions, overridden by the explicit ``captions`` where those give one."""
    merged = list(sidecars)
    if captions is None:
        return merged
    if isinstance(captions, Mapping):
        known = set(names) | {Path(n).stem for n in names}
        unknown = [str(key) for key in captions if key not in known]
        if unknown:
            raise DataError(
                f"captions name images that were not found: {', '.join(unknown)}; "
                f"the images are: {', '.join(names)} (key by file name, or by file name "
                "without extension)"
            )
        for i, name in enumerate(names):
            for key in (name, Path(name).stem):
                if key in captions:
                    merged[i] = _clean_caption(captions[key], name)
                    break
        return merged
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise DataError(
            f"captions must be a list (one per image) or a dict keyed by file name, "
            f"not {type(captions).__name__}"
        )
    if len(captions) != len(names):
        raise DataError(
            f"{len(captions)} captions were given for {len(names)} images "
            f"({', '.join(names)}); give exactly one caption (or None) per image, in this order"
        )
    for i, caption in enumerate(captions):
        if caption is not None:
            merged[i] = _clean_caption(caption, names[i])
    return merged


def _clean_caption(caption, name: str) -> str | None:
    if caption is None:
        return None
    if not isinstance(caption, str):
        raise DataError(f"the caption for {name} is a {type(caption).__name__}; give a string")
    return " ".join(caption.split()) or None  # one line: newlines in a sidecar are layout only


def _reason(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, IsADirectoryError):
        return "is a folder"
    if isinstance(err, UnidentifiedImageError):
        return "not an image, or a format Pillow cannot read"
    return str(err) or type(err).__name__


def _read_rgb(item: Path | Image.Image) -> Image.Image:
    if isinstance(item, Image.Image):
        item.load()
        return _upright_rgb(item)
    with Image.open(item) as image:
        image.load()  # decode now, so a truncated file fails here and is reported
        return _upright_rgb(image)


def _upright_rgb(image: Image.Image) -> Image.Image:
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # broken metadata must not reject a good photo: keep it as stored
        orientation = 1
    rgb = to_rgb(image)  # a new image: the caller's PIL object is never changed
    transpose = _UPRIGHT.get(orientation)
    return rgb.transpose(transpose) if transpose is not None else rgb


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit/int/float scaled into 0..255, transparency composited on white."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if mode == "F":
            # float images hold either 0..1 or 0..255 intensities
            scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
        else:
            # "I" is how Pillow stores 16-bit samples once converted; scale the 16-bit range,
            # never clip it (clipping would turn every mid-tone white)
            scale = 255.0 / 65535.0
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # RGB (copied), L, 1, P, CMYK, YCbCr, LAB, HSV
