"""Baseline trainers: ``cat``, ``lora``, ``dreambooth``, ``textual-inversion`` with fixed recipes.

``train(method, protocol, subject, out)`` trains one adapter for one subject of a protocol and
writes it (with ``training.json`` and ``train_log.csv``) to ``out``; see :mod:`kps_bench.train.core`.
"""

from __future__ import annotations

from pathlib import Path

from .core import METHODS, Recipe, TrainingInterrupted, TrainResult, load_recipe, make_trainer

__all__ = ["METHODS", "Recipe", "TrainResult", "TrainingInterrupted", "load_recipe", "train"]


def train(method: str, protocol, subject: str, out: str | Path, device: str = "auto", overrides=(),
          resume: bool = False, stop_after: int | None = None) -> TrainResult:
    """Train ``method`` for ``subject``; every input is validated before anything is written."""
    import importlib

    trainer = make_trainer(method, protocol, subject, out, device, overrides, resume, stop_after)
    module = importlib.import_module(f".{method.replace('-', '_')}", __name__)
    return module.train(trainer)
