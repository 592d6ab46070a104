"""Image tensors to PNG files (atomic), with text chunks describing how they were made."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from .files import atomic_write


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> 8-bit RGB."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def grid(images: torch.Tensor, columns: int | None = None) -> Image.Image:
    """(N, 3, H, W) in [0, 1] -> one image, `columns` wide (default: all in a row)."""
    count, _, height, width = images.shape
    columns = columns or count
    rows = -(-count // columns)
    sheet = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for index in range(count):
        sheet.paste(to_pil(images[index]), ((index % columns) * width, (index // columns) * height))
    return sheet


def labelled_rows(rows: list[tuple[str, torch.Tensor]], *, columns: int | None = None, zoom: int = 1,
                  label_width: int = 130, gap: int = 2) -> Image.Image:
    """One sheet: per (label, (N, 3, H, W) images in [0, 1]) a grid `columns` wide, its label on the left."""
    from PIL import ImageDraw

    pictures = [grid(images, columns) for _, images in rows]
    pictures = [p.resize((p.width * zoom, p.height * zoom), Image.NEAREST) for p in pictures]
    sheet = Image.new("RGB", (label_width + max(p.width for p in pictures), sum(p.height + gap for p in pictures)),
                      (255, 255, 255))
    draw, top = ImageDraw.Draw(sheet), 0
    for (label, _), picture in zip(rows, pictures, strict=True):
        draw.text((6, top + picture.height // 2 - 6), label, fill=(30, 30, 30))
        sheet.paste(picture, (label_width, top))
        top += picture.height + gap
    return sheet


INK, FRAME, PAPER = (30, 30, 30), (200, 200, 200), (255, 255, 255)
LINE_HEIGHT = 12  # pixels per caption line in PIL's default font


def wrap_text(draw, text: str, width: int) -> list[str]:
    """`text` broken at spaces into lines no wider than `width` pixels (a longer word keeps a line to itself)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def contact_sheet(references: torch.Tensor, rows: list[tuple[str, torch.Tensor]], captions: list[str], *,
                  columns: int = 6, zoom: int = 2, label_width: int = 120, gap: int = 6) -> Image.Image:
    """A sheet a person reads without the JSON: the references on top, then bands of `columns` prompts, each
    column headed by its prompt (wrapped to the column) with one labelled row per sampler beneath.

    references: (R, 3, H, W) and each row's images: (len(captions), 3, H, W), all in [0, 1]. Every drawn cell
    holds a picture: the reference row is as long as the references, centred, each picture framed.
    """
    from PIL import ImageDraw

    counts = {label: images.shape[0] for label, images in rows}
    if any(count != len(captions) for count in counts.values()):
        raise ValueError(f"each row needs one image per caption ({len(captions)}), got {counts}")
    cell = references.shape[-1] * zoom
    columns = max(1, min(columns, len(captions)))
    width = label_width + columns * (cell + gap) + gap
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    bands = [range(start, min(start + columns, len(captions))) for start in range(0, len(captions), columns)]
    header_lines = [max(len(wrap_text(measure, captions[i], cell)) for i in band) for band in bands]
    height = gap + cell + gap + sum(lines * LINE_HEIGHT + gap + len(rows) * (cell + gap) + gap
                                    for lines in header_lines)
    sheet = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(sheet)

    def paste(image: torch.Tensor, left: int, top: int) -> None:
        picture = to_pil(image).resize((cell, cell), Image.NEAREST)
        sheet.paste(picture, (left, top))
        draw.rectangle((left - 1, top - 1, left + cell, top + cell), outline=FRAME)

    top = gap
    draw.text((6, top + cell // 2 - 6), "references", fill=INK)
    first = label_width + (columns * (cell + gap) - references.shape[0] * (cell + gap)) // 2 + gap // 2
    for index in range(references.shape[0]):
        paste(references[index], first + index * (cell + gap), top)
    top += cell + 2 * gap
    for band, lines in zip(bands, header_lines):
        for column, index in enumerate(band):
            left = label_width + column * (cell + gap)
            for number, line in enumerate(wrap_text(measure, captions[index], cell)):
                draw.text((left, top + number * LINE_HEIGHT), line, fill=INK)
        top += lines * LINE_HEIGHT + gap
        for label, images in rows:
            draw.text((6, top + cell // 2 - 6), label, fill=INK)
            for column, index in enumerate(band):
                paste(images[index], label_width + column * (cell + gap), top)
            top += cell + gap
        top += gap
    return sheet


def save_png(image: Image.Image, path: str | os.PathLike, text: dict[str, str] | None = None) -> Path:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def save_grid(images: torch.Tensor, path: str | os.PathLike, text: dict[str, str] | None = None) -> Path:
    return save_png(grid(images), path, text)


CURVE_COLOURS = {"loss/teacher": (40, 90, 200), "loss/student": (210, 60, 40), "loss/heads": (40, 150, 60)}


def loss_curve(history: list[tuple[int, dict[str, float]]], size: tuple[int, int] = (512, 256)) -> Image.Image:
    """A plot of the teacher, student and discriminator losses over the steps, with a legend."""
    from PIL import ImageDraw

    width, height = size
    margin = 28
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((margin, 8, width - 8, height - margin), outline=(160, 160, 160))
    series = {name: [(s, logs[name]) for s, logs in history if name in logs] for name in CURVE_COLOURS}
    values = [v for points in series.values() for _, v in points]
    if not values:
        draw.text((margin + 8, height // 2), "no steps trained (reused run)", fill=(90, 90, 90))
        return image
    low, high = min(values), max(values)
    high = high if high > low else low + 1.0
    first, last = history[0][0], max(history[-1][0], history[0][0] + 1)

    def point(step: int, value: float) -> tuple[float, float]:
        x = margin + (step - first) / (last - first) * (width - 8 - margin)
        y = height - margin - (value - low) / (high - low) * (height - margin - 8)
        return x, y

    for name, points in series.items():
        if len(points) > 1:
            draw.line([point(s, v) for s, v in points], fill=CURVE_COLOURS[name], width=2)
        elif points:
            x, y = point(*points[0])
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=CURVE_COLOURS[name])
    for index, name in enumerate(series):
        draw.text((margin + 6 + 90 * index, height - margin + 6), name.split("/")[1], fill=CURVE_COLOURS[name])
    draw.text((2, 8), f"{high:.2f}", fill=(90, 90, 90))
    draw.text((2, height - margin - 10), f"{low:.2f}", fill=(90, 90, 90))
    draw.text((width - 60, height - margin + 6), f"step {history[-1][0]}", fill=(90, 90, 90))
    return image
