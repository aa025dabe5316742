"""Baseline trainers: ``cat``, ``lora``, ``dreambooth``, ``textual-inversion`` with fixed recipes.

``train(method, protocol, subject, out)`` trains one adapter for one subject of a protocol and
writes it (with ``training.json`` and ``train_log.csv``) to ``out``. The modules: ``recipe`` (hyperparameters),
``data`` (latents, captions, random draws), ``trainer`` (setup -> build -> loop -> save, on accelerate), ``checkpoint``
(``--resume``), ``output`` (``OUT.partial``, the loss log, training.json), and one per method (``lora``, ``cat``,
``dreambooth``, ``textual_inversion``: its build, loss and save).
"""

from __future__ import annotations

from pathlib import Path

from .output import TrainResult
from .recipe import METHODS, Recipe, load_recipe
from .trainer import TrainingInterrupted, make_trainer, run

__all__ = ["METHODS", "Recipe", "TrainResult", "TrainingInterrupted", "load_recipe", "train"]


def train(method: str, protocol, subject: str, out: str | Path, device: str = "auto", overrides=(),
          resume: bool = False, stop_after: int | None = None, seed: int | None = None) -> TrainResult:
    """Train ``method`` for ``subject`` holding the lock of ``out`` (one trainer per output; under a launcher, rank 0
    holds it for the launch); every input is validated before anything is written. ``seed`` overrides the recipe's
    seed (``train-baseline --seed``)."""
    import contextlib
    import importlib

    from ..distributed import launch_rank
    from ..errors import stop_when_disk_full
    from ..lock import exclusive, lock_beside
    from ..rundir import check_writable
    from .output import partial_dir

    out = Path(out).expanduser()
    check_writable(out)
    with (stop_when_disk_full(partial_dir(out), "re-run the same `kps-bench train-baseline` command with --resume"),
          exclusive(lock_beside(out), f"adapter output '{out}'") if launch_rank() == 0
          else contextlib.nullcontext()):
        trainer = make_trainer(method, protocol, subject, out, device, overrides, resume, stop_after, seed)
        module = importlib.import_module(f".{method.replace('-', '_')}", __name__)
        return run(trainer, module)
