"""The shapes-world image domain: factors, deterministic rendering and captions.

Pure numpy (no torch), so rendering is cheap to import. Every image is rendered from a
``Factors`` record and keeps it as its label. Rendering is supersampled (anti-aliased) and
fully deterministic for a given seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np

RES = 32
SS = 3  # supersampling factor

SHAPES = ["circle", "square", "triangle", "star", "heart", "cross"]
# Fill colours of the base distribution (what the text-to-image model is trained on).
BASE_COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown"]
# Fill colours outside the base distribution: the text-to-image model never sees them, the probe and the
# encoders do (the wide distribution), so the probe can tell an off-distribution colour from a base one.
OFF_COLOURS = ["teal", "magenta", "lime"]
COLOURS = BASE_COLOURS + OFF_COLOURS
PATTERNS = ["plain", "striped", "dotted", "checkered"]
BACKGROUNDS = ["white", "black", "gray", "sky", "beige"]
SIZES = ["small", "medium", "large"]
# Second colour of a pattern. The base distribution only uses white and black.
BASE_PATTERN_COLOURS = ["white", "black"]
# Chromatic pattern and centre-dot colours of the wide distribution (on off-distribution fills only).
WIDE_PATTERN_COLOURS = ["black", "orange", "purple", "red", "white", "yellow"]
# The probe's pattern-colour labels: "none" for a plain object.
PATTERN_COLOURS = ["none"] + WIDE_PATTERN_COLOURS

RGB = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 225, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "purple": (120, 40, 160),
    "pink": (255, 150, 200),
    "brown": (120, 70, 30),
    "teal": (0, 128, 128),
    "magenta": (220, 0, 220),
    "lime": (170, 240, 0),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "sky": (150, 200, 245),
    "beige": (225, 205, 165),
}
SIZE_RADIUS = {"small": 6.0, "medium": 9.0, "large": 12.0}
PATTERN_WORD = {"plain": "plain", "striped": "striped", "dotted": "dotted", "checkered": "checkered"}


@dataclass
class Factors:
    shape: str
    colour: str
    pattern: str = "plain"
    pattern_colour: str = "white"
    background: str = "white"
    size: str = "medium"
    cx: float = 16.0
    cy: float = 16.0
    rotation: float = 0.0  # degrees
    centre_dot: str | None = None  # colour of a dot in the object's centre (wide distribution only)
    radius_jitter: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------- shapes
def _polygon_inside(x: np.ndarray, y: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over points."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(verts)
    for i in range(n):
        x1, y1 = verts[i]
        x2, y2 = verts[(i + 1) % n]
        cond = (y1 > y) != (y2 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = (x2 - x1) * (y - y1) / (y2 - y1 + 1e-12) + x1
        inside ^= cond & (x < xint)
    return inside


def _star_verts(n=5, r_out=1.0, r_in=0.45):
    a = np.arange(2 * n) * np.pi / n - np.pi / 2
    r = np.where(np.arange(2 * n) % 2 == 0, r_out, r_in)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


_TRI = np.array([[0.0, -1.0], [0.95, 0.75], [-0.95, 0.75]])
_STAR = _star_verts()


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in the object's local frame (u right, v down, unit radius)."""
    if shape == "circle":
        return u * u + v * v <= 0.9
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":
        return _polygon_inside(u, v, _TRI)
    if shape == "star":
        return _polygon_inside(u, v, _STAR * 1.08)
    if shape == "heart":
        x = u * 1.25
        y = -(v * 1.25 - 0.15)
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if shape == "cross":
        a, b = np.abs(u), np.abs(v)
        return ((a <= 0.32) & (b <= 0.95)) | ((b <= 0.32) & (a <= 0.95))
    raise ValueError(f"unknown shape {shape!r}")


def pattern_mask(pattern: str, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Pattern in object-aligned pixel coordinates (px, py measured from the centre)."""
    if pattern == "plain":
        return np.zeros(px.shape, dtype=bool)
    if pattern == "striped":
        return np.mod(px + 1.0, 5.0) < 2.0
    if pattern == "dotted":
        gx = np.mod(px, 5.0) - 2.5
        gy = np.mod(py, 5.0) - 2.5
        return gx * gx + gy * gy <= 1.4 ** 2
    if pattern == "checkered":
        return (np.floor((px + 1.5) / 3.0) + np.floor((py + 1.5) / 3.0)) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}")


_GRID_CACHE: dict = {}


def _grid():
    if "g" not in _GRID_CACHE:
        n = RES * SS
        c = (np.arange(n) + 0.5) / SS
        _GRID_CACHE["g"] = np.meshgrid(c, c)  # X (cols), Y (rows)
    return _GRID_CACHE["g"]


def render(f: Factors, fill_rgb: tuple[float, float, float] | None = None) -> np.ndarray:
    """Render one image as a uint8 array of shape (32, 32, 3); ``fill_rgb`` replaces the fill colour's RGB."""
    X, Y = _grid()
    dx, dy = X - f.cx, Y - f.cy
    th = np.deg2rad(f.rotation)
    c, s = np.cos(th), np.sin(th)
    px = c * dx + s * dy
    py = -s * dx + c * dy
    r = SIZE_RADIUS[f.size] * f.radius_jitter
    inside = shape_mask(f.shape, px / r, py / r)
    pat = pattern_mask(f.pattern, px, py) & inside
    img = np.empty(X.shape + (3,), dtype=np.float32)
    img[:] = RGB[f.background]
    img[inside] = RGB[f.colour] if fill_rgb is None else fill_rgb
    img[pat] = RGB[f.pattern_colour]
    if f.centre_dot:
        dot = (px * px + py * py <= (0.28 * r) ** 2) & inside
        img[dot] = RGB[f.centre_dot]
    n = RES
    img = img.reshape(n, SS, n, SS, 3).mean(axis=(1, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render_many(factors: Iterable[Factors]) -> np.ndarray:
    fs = list(factors)
    out = np.empty((len(fs), RES, RES, 3), dtype=np.uint8)
    for i, f in enumerate(fs):
        out[i] = render(f)
    return out


# ------------------------------------------------------------------------------------- sampling
def sample_factors(
    rng: np.random.Generator,
    colours: list[str] | None = None,
    pattern_colours: list[str] | None = None,
    shapes: list[str] | None = None,
) -> Factors:
    """Draw one object of the base distribution (or of a wider one, for the probe)."""
    colours = colours or BASE_COLOURS
    pattern_colours = pattern_colours or BASE_PATTERN_COLOURS
    shapes = shapes or SHAPES
    size = SIZES[rng.integers(len(SIZES))]
    r = SIZE_RADIUS[size]
    jit = float(rng.uniform(0.92, 1.08))
    margin = r * jit + 1.0
    lo, hi = margin, RES - margin
    cx = float(rng.uniform(lo, hi)) if hi > lo else RES / 2
    cy = float(rng.uniform(lo, hi)) if hi > lo else RES / 2
    colour = colours[rng.integers(len(colours))]
    pcs = [p for p in pattern_colours if p != colour]
    return Factors(
        shape=shapes[rng.integers(len(shapes))],
        colour=colour,
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
        pattern_colour=pcs[rng.integers(len(pcs))],
        background=BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
        size=size,
        cx=cx,
        cy=cy,
        rotation=float(rng.uniform(-25, 25)),
        radius_jitter=jit,
    )


def caption(f: Factors, rng: np.random.Generator | None = None, keep: float = 0.55) -> str:
    """Caption of a base object. With ``rng``, each attribute is kept with probability ``keep``.

    Full form: "a small red striped star on a blue background". Attributes left out make the
    class prompts ("a star", "a red star") whose images vary over the omitted factors.
    """
    def k() -> bool:
        return rng is None or rng.random() < keep

    words = ["a"]
    if f.size != "medium" and k():
        words.append(f.size)
    if k():
        words.append(f.colour)
    if f.pattern != "plain" and k():
        words.append(PATTERN_WORD[f.pattern])
    words.append(f.shape)
    if k():
        words += ["on", "a", f.background, "background"]
    return " ".join(words)


def caption_claims(text: str) -> dict[str, str]:
    """The factor values a caption states, e.g. "a red star on a blue background" ->
    ``{"colour": "red", "shape": "star", "background": "blue"}`` (omitted factors are not claimed)."""
    words = text.split()
    claims: dict[str, str] = {}
    if "on" in words:
        i = words.index("on")
        if i + 2 < len(words):
            claims["background"] = words[i + 2]
        words = words[:i]
    for w in words:
        for factor, values in (("size", SIZES), ("colour", COLOURS), ("pattern", PATTERNS), ("shape", SHAPES)):
            if w in values:
                claims[factor] = w
    return claims


def describes(claims: dict[str, str], f: Factors) -> bool:
    """Whether every factor a caption claims is true of the object ``f``."""
    return all(getattr(f, k) == v for k, v in claims.items())


def claims_matrix(claims: list[dict[str, str]], fs: list[Factors]) -> np.ndarray:
    """``[len(fs), len(claims)]`` bool: entry (i, j) is ``describes(claims[j], fs[i])``."""
    values = {k: np.array([getattr(f, k) for f in fs]) for k in {k for c in claims for k in c}}
    out = np.ones((len(fs), len(claims)), dtype=bool)
    for j, c in enumerate(claims):
        for k, v in c.items():
            out[:, j] &= values[k] == v
    return out


def sample_dataset(n: int, seed: int, colours=None, pattern_colours=None, with_captions=True, keep=0.55):
    """``n`` (images uint8 [n,32,32,3], factors list, captions list) for a seed."""
    rng = np.random.default_rng(seed)
    fs = [sample_factors(rng, colours, pattern_colours) for _ in range(n)]
    caps = [caption(f, rng, keep) for f in fs] if with_captions else None
    return render_many(fs), fs, caps


def wide_dataset(n: int, seed: int):
    """``n`` (images, factors) of the wide distribution: every colour (off-distribution ones too),
    chromatic pattern colours and occasional centre dots on off-distribution fills, and 10% of base
    fills with a white or black centre dot. The probe's and the encoders' training distribution."""
    g = np.random.default_rng(seed)
    fs = []
    for _ in range(n):
        f = sample_factors(g, colours=COLOURS)
        if f.colour in OFF_COLOURS:
            pcs = BASE_PATTERN_COLOURS + [c for c in WIDE_PATTERN_COLOURS if c not in BASE_PATTERN_COLOURS]
            f.pattern_colour = pcs[g.integers(len(pcs))]
            if g.random() < 0.4:
                f.centre_dot = WIDE_PATTERN_COLOURS[g.integers(len(WIDE_PATTERN_COLOURS))]
        elif g.random() < 0.1:
            f.centre_dot = BASE_PATTERN_COLOURS[g.integers(2)]
        fs.append(f)
    return render_many(fs), fs


def pattern_colour_of(f: Factors) -> str:
    """The pattern's second colour as the probe labels it ("none" for a plain object)."""
    return "none" if f.pattern == "plain" else f.pattern_colour


def labels_of(fs: list[Factors]) -> dict[str, np.ndarray]:
    """Integer labels per factor (indices into SHAPES, COLOURS, PATTERNS, PATTERN_COLOURS, BACKGROUNDS, SIZES)."""
    return {
        "shape": np.array([SHAPES.index(f.shape) for f in fs]),
        "colour": np.array([COLOURS.index(f.colour) for f in fs]),
        "pattern": np.array([PATTERNS.index(f.pattern) for f in fs]),
        "pattern_colour": np.array([PATTERN_COLOURS.index(pattern_colour_of(f)) for f in fs]),
        "background": np.array([BACKGROUNDS.index(f.background) for f in fs]),
        "size": np.array([SIZES.index(f.size) for f in fs]),
    }
