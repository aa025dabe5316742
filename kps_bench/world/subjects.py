"""Personal subjects of the shapes world: one fixed, distinctive instance each.

Each subject wears a fill colour that the base distribution never produces (``SUBJECT_COLOURS``),
a pattern in a chromatic second colour (the base only uses white/black pattern colours) and a
dot in its centre. Its *signature* for the ground-truth probe is the (colour, pattern) pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .render import Factors, SIZE_RADIUS, render


@dataclass(frozen=True)
class Subject:
    name: str
    class_noun: str
    trigger: str
    colour: str
    pattern: str
    pattern_colour: str
    centre_dot: str

    def signature(self) -> dict:
        return {"shape": self.class_noun, "colour": self.colour, "pattern": self.pattern}

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "class_noun": self.class_noun,
            "trigger": self.trigger,
            "signature": self.signature(),
            "look": {
                "shape": self.class_noun,
                "colour": self.colour,
                "pattern": self.pattern,
                "pattern_colour": self.pattern_colour,
                "centre_dot": self.centre_dot,
            },
            "description": (
                f"a {self.colour} {self.class_noun} with a {self.pattern_colour} {self.pattern} pattern "
                f"and a {self.centre_dot} dot in its centre"
            ),
        }


SUBJECTS = [
    Subject("teal-star", "star", "sks", "teal", "checkered", "orange", "white"),
    Subject("magenta-heart", "heart", "zwx", "magenta", "striped", "yellow", "black"),
    Subject("lime-circle", "circle", "qlo", "lime", "dotted", "purple", "red"),
]
SUBJECT_PATTERN_COLOURS = sorted({s.pattern_colour for s in SUBJECTS} | {s.centre_dot for s in SUBJECTS})


def subject_factors(s: Subject, rng: np.random.Generator, backgrounds=None, size=None) -> Factors:
    from .render import BACKGROUNDS, RES

    size = size or ["medium", "large"][rng.integers(2)]
    r = SIZE_RADIUS[size]
    lo, hi = r + 1.0, RES - r - 1.0
    bgs = backgrounds or BACKGROUNDS
    return Factors(
        shape=s.class_noun,
        colour=s.colour,
        pattern=s.pattern,
        pattern_colour=s.pattern_colour,
        background=bgs[rng.integers(len(bgs))],
        size=size,
        cx=float(rng.uniform(lo, hi)),
        cy=float(rng.uniform(lo, hi)),
        rotation=float(rng.uniform(-15, 15)),
        centre_dot=s.centre_dot,
    )


def reference_factors(s: Subject, seed: int = 0) -> list[Factors]:
    """Five reference views: varied position, size and background."""
    rng = np.random.default_rng(seed + sum(map(ord, s.name)))
    bgs = ["white", "sky", "gray", "beige", "black"]
    sizes = ["large", "medium", "large", "medium", "large"]
    return [subject_factors(s, rng, backgrounds=[bgs[i]], size=sizes[i]) for i in range(5)]


def reference_images(s: Subject, seed: int = 0) -> list[np.ndarray]:
    return [render(f) for f in reference_factors(s, seed)]
