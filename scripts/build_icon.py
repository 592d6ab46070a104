"""Draw the pack's icon, docs/icon.png (400x400; `[tool.comfy] Icon` in pyproject.toml points at it).

The mark: a one-step arrow leaving a dot, with the echo rings it sends back behind it. Drawn at 4x and
downsampled for smooth edges; deterministic, so re-running it rewrites the same file.

    .venv/bin/python scripts/build_icon.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 400
SCALE = 4  # supersampling factor
BACKGROUND = (22, 27, 45)
RING = (94, 234, 212)  # teal; fainter with each echo
ARROW = (250, 250, 250)
OUT = Path(__file__).resolve().parents[1] / "docs" / "icon.png"


def draw_icon() -> Image.Image:
    s = SIZE * SCALE
    image = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((0, 0, s - 1, s - 1), radius=int(0.22 * s), fill=BACKGROUND)

    # Echo rings: arcs opening to the right, centred on the arrow's start, fading outwards.
    cx, cy = int(0.42 * s), s // 2
    for radius, alpha in ((0.12, 255), (0.20, 170), (0.28, 95)):
        r = int(radius * s)
        ring = Image.new("RGBA", (s, s), (0, 0, 0, 0))
        ImageDraw.Draw(ring).arc((cx - r, cy - r, cx + r, cy + r), start=118, end=242,
                                 fill=(*RING, alpha), width=int(0.032 * s))
        image.alpha_composite(ring)

    # The one step: a dot and a single bold arrow to the right.
    dot = int(0.055 * s)
    draw.ellipse((cx - dot, cy - dot, cx + dot, cy + dot), fill=RING)
    shaft = int(0.06 * s)
    tip_x, head_len, head_half = int(0.86 * s), int(0.16 * s), int(0.14 * s)
    draw.rectangle((cx, cy - shaft // 2, tip_x - head_len + 2, cy + shaft // 2), fill=ARROW)
    draw.polygon([(tip_x, cy), (tip_x - head_len, cy - head_half), (tip_x - head_len, cy + head_half)], fill=ARROW)
    return image.resize((SIZE, SIZE), Image.LANCZOS)


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    draw_icon().save(OUT, optimize=True)
    print(f"wrote {OUT} ({SIZE}x{SIZE})")
