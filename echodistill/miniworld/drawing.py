"""Drawing primitives of the mini world: layouts, backgrounds, shape masks, painters, compositing.

render.py (grammar scenes) and concepts.py (the held-out subjects) both draw with these. A scene (grammar.Scene: words) becomes a picture through a `Layout` (numbers: the exact
centre, radius, rotation and background phase), drawn from a numpy Generator, so one seed
gives one picture on every machine. Everything is drawn on a 4× supersampled grid and
box-filtered down: edges are antialiased like a real downscaled photo, and a shape's identity
survives at the 6-pixel radius of a "small" object.

Objects are painted in a local frame (u to the right, v down, in units of the radius, rotated
by the layout's angle) as a list of layers (mask, colour); concepts (concepts.py) paint several
layers the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .grammar import POSITIONS, SHAPES, Scene

RESOLUTION = 64
SUPERSAMPLE = 3

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.16),
    "yellow": (0.95, 0.83, 0.16),
    "green": (0.16, 0.67, 0.24),
    "blue": (0.16, 0.31, 0.86),
    "white": (0.96, 0.96, 0.96),
    "black": (0.08, 0.08, 0.08),
}
_LIGHT = ("white", "yellow")  # their pattern partner is a darker shade, the others' a lighter tint

# Object centres in pixels (x, y); far enough from the border that a large object stays whole.
POSITION_CENTRES: dict[str, tuple[float, float]] = {
    "left": (19.0, 32.0),
    "right": (45.0, 32.0),
    "top": (32.0, 19.0),
    "bottom": (32.0, 45.0),
    "center": (32.0, 32.0),
}
RADII: dict[str, tuple[float, float]] = {"small": (6.0, 8.0), "large": (13.0, 16.0)}
CENTRE_JITTER = 2.0  # pixels, each axis
ANGLE_JITTER = np.deg2rad(15.0)
STRIPE_PERIOD = 8.0  # pixels; also the checker cell size

Layer = tuple[np.ndarray, tuple[float, float, float]]  # (supersampled bool mask, RGB in [0, 1])
Painter = Callable[[np.ndarray, np.ndarray], list[Layer]]  # (u, v) local frame -> layers, bottom first


@dataclass(frozen=True)
class Layout:
    """Where exactly things go: the numbers a caption leaves open."""

    cx: float
    cy: float
    radius: float
    angle: float  # radians, counter-clockwise on screen
    bg_phase: tuple[float, float]  # stripe/checker offsets in pixels
    gradient_vertical: bool


def sample_layout(scene: Scene, rng: np.random.Generator, angle_jitter: float = ANGLE_JITTER) -> Layout:
    cx, cy = POSITION_CENTRES[scene.position]
    jitter = rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, size=2)
    low, high = RADII[scene.size]
    return Layout(
        cx=float(cx + jitter[0]),
        cy=float(cy + jitter[1]),
        radius=float(rng.uniform(low, high)),
        angle=float(rng.uniform(-angle_jitter, angle_jitter)),
        bg_phase=(float(rng.uniform(0, STRIPE_PERIOD)), float(rng.uniform(0, STRIPE_PERIOD))),
        gradient_vertical=bool(rng.random() < 0.5),
    )


def pattern_partner(color: str) -> tuple[float, float, float]:
    """The second colour of a striped/checkered/gradient background: a shade or a tint."""
    rgb = np.asarray(PALETTE[color])
    partner = rgb * 0.55 if color in _LIGHT else rgb + (1.0 - rgb) * 0.5
    return tuple(float(c) for c in partner)


def _grid(size: int = RESOLUTION, supersample: int = SUPERSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-unit coordinates of the supersampled sample points: x, y each (S·R, S·R)."""
    coords = ((np.arange(size * supersample) + 0.5) / supersample).astype(np.float32)
    return np.meshgrid(coords, coords)  # x varies along columns, y along rows


_X, _Y = _grid()


def paint_background(bg_color: str, bg_pattern: str, layout: Layout) -> np.ndarray:
    """(S·R, S·R, 3) float background."""
    base = np.asarray(PALETTE[bg_color], dtype=np.float32)
    partner = np.asarray(pattern_partner(bg_color), dtype=np.float32)
    if bg_pattern == "plain":
        return np.broadcast_to(base, (*_X.shape, 3))
    elif bg_pattern == "striped":  # diagonal stripes, half the period each
        weight = (((_X + _Y + layout.bg_phase[0]) % STRIPE_PERIOD) < STRIPE_PERIOD / 2).astype(np.float32)
    elif bg_pattern == "checkered":
        cells = np.floor((_X + layout.bg_phase[0]) / STRIPE_PERIOD) + np.floor((_Y + layout.bg_phase[1]) / STRIPE_PERIOD)
        weight = (cells % 2).astype(np.float32)
    elif bg_pattern == "gradient":
        weight = (_Y if layout.gradient_vertical else _X) / RESOLUTION
    else:
        raise ValueError(f"unknown background pattern {bg_pattern!r}")
    return base * (1.0 - weight[..., None]) + partner * weight[..., None]


def local_frame(layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """The object's frame (u right, v down, radius = 1), rotated by the layout's angle."""
    dx, dy = (_X - layout.cx) / layout.radius, (_Y - layout.cy) / layout.radius
    cos, sin = np.cos(layout.angle), np.sin(layout.angle)
    return cos * dx - sin * dy, sin * dx + cos * dy


# --- shape masks in the local frame (the grammar's shapes; concepts combine them) -----------------

def disk(u: np.ndarray, v: np.ndarray, r: float = 1.0, cu: float = 0.0, cv: float = 0.0) -> np.ndarray:
    return (u - cu) ** 2 + (v - cv) ** 2 <= r * r


def annulus(u: np.ndarray, v: np.ndarray, inner: float, outer: float = 1.0) -> np.ndarray:
    rho2 = u * u + v * v
    return (rho2 >= inner * inner) & (rho2 <= outer * outer)


def box(u: np.ndarray, v: np.ndarray, half_u: float, half_v: float, cu: float = 0.0, cv: float = 0.0) -> np.ndarray:
    return (np.abs(u - cu) <= half_u) & (np.abs(v - cv) <= half_v)


def triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pointing up: apex (0, −1), base corners (±0.95, 0.7)."""
    return (v <= 0.7) & (np.abs(u) <= 0.95 * (v + 1.0) / 1.7)


def rhombus(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Taller than wide, so it never reads as a rotated square."""
    return np.abs(u) / 0.7 + np.abs(v) <= 1.05


def star(u: np.ndarray, v: np.ndarray, points: int = 5, inner: float = 0.45) -> np.ndarray:
    """A straight-edged star, one point up: compare the distance with the edge's along the ray."""
    theta = np.arctan2(u, -v)  # 0 straight up, increasing clockwise on screen
    sector = 2 * np.pi / points
    local = np.abs(((theta + sector / 2) % sector) - sector / 2)  # angle from the nearest point, in [0, sector/2]
    # The edge runs from the point (radius 1, angle 0) to the inner corner (radius `inner`, angle sector/2).
    a = np.array([1.0, 0.0])
    b = inner * np.array([np.cos(sector / 2), np.sin(sector / 2)])
    edge = b - a
    direction_cross = np.cos(local) * edge[1] - np.sin(local) * edge[0]
    edge_radius = (a[0] * edge[1] - a[1] * edge[0]) / direction_cross
    return np.sqrt(u * u + v * v) <= edge_radius


SHAPE_MASKS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: disk(u, v),
    "square": lambda u, v: box(u, v, 0.85, 0.85),
    "triangle": triangle,
    "diamond": rhombus,
    "star": star,
    "ring": lambda u, v: annulus(u, v, 0.55),
}
assert set(SHAPE_MASKS) == set(SHAPES), "every grammar shape needs a mask"


def shape_painter(shape: str, color: str) -> Painter:
    mask = SHAPE_MASKS[shape]
    return lambda u, v: [(mask(u, v), PALETTE[color])]


def compose(background: np.ndarray, layers: list[Layer]) -> np.ndarray:
    """Paint layers over the supersampled background and box-filter to (R, R, 3) uint8."""
    canvas = background.copy()
    for mask, color in layers:
        canvas[mask] = color
    s = SUPERSAMPLE
    pooled = canvas.reshape(RESOLUTION, s, RESOLUTION, s, 3).mean(axis=(1, 3))  # (R, R, 3)
    return np.clip(np.rint(pooled * 255.0), 0, 255).astype(np.uint8)


def draw(scene: Scene, layout: Layout, painter: Painter) -> np.ndarray:
    """(64, 64, 3) uint8 picture: `painter`'s object placed by `layout` on `scene`'s background."""
    u, v = local_frame(layout)
    return compose(paint_background(scene.bg_color, scene.bg_pattern, layout), painter(u, v))


assert set(POSITION_CENTRES) == set(POSITIONS)
