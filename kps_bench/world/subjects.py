"""Personal subjects of the shapes world (v2): one fixed instance each, drawn from the base palette.

A subject is a specific combination of the base distribution's own fill colour, pattern and pattern
colour on one shape ("a purple circle with black stripes"), so the base VAE keeps its look and the
base UNet can draw it, while its class prompt ("a circle") shows it in only 1 of 64 images (8 fill
colours x 4 patterns x 2 pattern colours). Its *signature*, what the ground-truth probe checks, is
(colour, pattern, pattern colour). The choice was measured (VAE survival, CLIP identity headroom,
the base UNet's rate on the subject's full caption): see the model card.

``split``: ``evaluation`` subjects are the ones leaderboards and the demo report; ``development``
subjects are used only to choose training recipes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .render import BACKGROUNDS, RES, SIZE_RADIUS, Factors, render

SPLITS = ("evaluation", "development")


@dataclass(frozen=True)
class Subject:
    name: str
    class_noun: str
    trigger: str
    colour: str
    pattern: str
    pattern_colour: str
    split: str = "evaluation"

    def signature(self) -> dict:
        """What the probe must read for an image to show this subject."""
        return {"shape": self.class_noun, "colour": self.colour, "pattern": self.pattern,
                "pattern_colour": self.pattern_colour}

    @property
    def description(self) -> str:
        return f"a {self.colour} {self.class_noun} with {self.pattern_colour} {PATTERN_NOUN[self.pattern]}"

    def to_json(self) -> dict:
        return {"name": self.name, "class_noun": self.class_noun, "trigger": self.trigger, "split": self.split,
                "signature": self.signature(), "description": self.description}


PATTERN_NOUN = {"striped": "stripes", "dotted": "dots", "checkered": "checks"}

SUBJECTS = [
    Subject("purple-circle", "circle", "sks", "purple", "striped", "black", "evaluation"),
    Subject("orange-heart", "heart", "zwx", "orange", "striped", "white", "evaluation"),
    Subject("red-triangle", "triangle", "qlo", "red", "dotted", "white", "evaluation"),
    Subject("green-cross", "cross", "vbt", "green", "striped", "white", "development"),
    Subject("yellow-square", "square", "pmq", "yellow", "checkered", "white", "development"),
    # a round development subject: CAT's trigger images lose their shape on round subjects, which the cross and
    # the square did not show (kps_bench/train/README.md)
    Subject("blue-circle", "circle", "dqv", "blue", "checkered", "white", "development"),
    # a dotted development subject: LoRA draws white dots as stripes (red-triangle), which no striped or
    # checkered subject showed (kps_bench/train/README.md)
    Subject("red-square", "square", "hjn", "red", "dotted", "white", "development"),
]


def subject_by_name(name: str) -> Subject | None:
    return next((s for s in SUBJECTS if s.name == name), None)


def shows(labels: dict, signature: dict) -> bool:
    """Whether probe labels of one image show a signature (its colour, pattern and pattern colour)."""
    return all(labels[k] == signature[k] for k in ("colour", "pattern", "pattern_colour"))


def subject_factors(s: Subject, rng: np.random.Generator, backgrounds=None, size=None) -> Factors:
    """One view of the subject: medium or large, random position, rotation (±15°) and background."""
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
    )


def reference_factors(s: Subject, seed: int = 0) -> list[Factors]:
    """Five reference views: varied position, size and background."""
    rng = np.random.default_rng(seed + sum(map(ord, s.name)))
    bgs = ["white", "sky", "gray", "beige", "black"]
    sizes = ["large", "medium", "large", "medium", "large"]
    return [subject_factors(s, rng, backgrounds=[bgs[i]], size=sizes[i]) for i in range(5)]


def reference_images(s: Subject, seed: int = 0) -> list[np.ndarray]:
    return [render(f) for f in reference_factors(s, seed)]
