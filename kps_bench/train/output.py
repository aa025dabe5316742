"""What a training writes: ``OUT.partial`` while it runs, the loss log, and ``training.json``, renamed to ``OUT`` at the
end, so a failed run never leaves a half-written adapter behind."""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from .checkpoint import checkpoint_dir, latest_checkpoint

if TYPE_CHECKING:
    from .trainer import Trainer

LOG_FILE = "train_log.csv"
TRAINING_JSON = "training.json"


@dataclass
class TrainResult:
    out: Path
    training: dict


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


@contextlib.contextmanager
def work_folder(trainer: Trainer):
    """Create ``OUT.partial``; on a user error before the first checkpoint, remove it again."""
    from .trainer import TrainingInterrupted

    created = not trainer.work.exists()
    trainer.work.mkdir(parents=True, exist_ok=True)
    try:
        yield trainer.work
    except BaseException as e:
        if isinstance(e, TrainingInterrupted):
            raise
        if created and latest_checkpoint(trainer.work) is None and trainer.work.exists():
            shutil.rmtree(trainer.work, ignore_errors=True)
        raise


def logged_rows(path: Path, upto: int) -> list[dict]:
    """The complete rows of the loss log ``path`` with step <= ``upto``. A row cut short (a full disk, a kill) lacks its
    line end, and may lack fields or hold a shortened number (step 12 cut to 1), so it is dropped."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if line.endswith("\n")]
    rows = csv.DictReader(lines)
    return [row for row in rows if len(row) == len(rows.fieldnames) and None not in row.values()
            and row["step"].isdigit() and int(row["step"]) <= upto]


class LossLog:
    """``train_log.csv``: every loss term, learning rate and gradient norm per step, written by the main process. On
    resume the rows up to the checkpoint are kept and later ones dropped; :attr:`rows` holds every row of the run."""

    def __init__(self, path: Path, start: int, main_process: bool):
        self.path, self.main_process = path, main_process
        self.kept = logged_rows(path, start) if start and path.is_file() else []
        self.rows = list(self.kept)
        self.file = self.writer = None

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if not self.main_process:
            return
        if self.writer is None:
            self.file = open(self.path, "w", newline="", encoding="utf-8")
            self.writer = csv.DictWriter(self.file, fieldnames=list(row))
            self.writer.writeheader()
            for old in self.kept:
                self.writer.writerow({k: old.get(k, "") for k in row})
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()

    def final_losses(self) -> dict:
        """Every loss term at the last step and its mean over the last 10% of steps, from the whole log: it keeps the
        steps before a resume, so a resumed run reports what an uninterrupted one does."""
        rows = self.rows
        tail = rows[-max(1, len(rows) // 10):]
        keys = [k for k in rows[-1] if k.startswith("loss")] if rows else []
        return {"last_step": {k: float(rows[-1][k]) for k in keys},
                "mean_last_10pct": {k: sum(float(t[k]) for t in tail) / len(tail) for k in keys}}


def finish(trainer: Trainer, files: list[str]) -> TrainResult:
    """Write training.json, drop the checkpoints, rename ``OUT.partial`` to ``OUT``."""
    from .. import __version__
    from ..models import file_sha256
    from ..provenance import device_info, git_commit, now_iso, package_versions
    from ..rundir import write_json_atomic

    acc, r = trainer.accelerator, trainer.recipe
    acc.wait_for_everyone()
    training = {
        "method": trainer.method, "subject": trainer.subject.name, "trigger": trainer.subject.trigger,
        "class_noun": trainer.subject.class_noun,
        "protocol": {"name": trainer.protocol.name, "version": trainer.protocol.version,
                     "sha256": trainer.protocol.sha256},
        "protocol_sha256": trainer.protocol.sha256,
        "base_model": trainer.base_identity,
        "recipe": r.to_dict(), "recipe_sha256": r.sha256, "recipe_sources": trainer.recipe_sources,
        "seed": r.seed, "steps": r.steps,
        "allow_prompt_overlap": trainer.protocol.allow_prompt_overlap,
        "captions": trainer.data.captions.with_trigger,
        "final_loss": trainer.final_losses,
        "duration_s": round(time.perf_counter() - trainer.t0, 2),
        "start_time": trainer.start_time, "end_time": now_iso(),
        "num_processes": acc.num_processes, "global_batch_size": r.global_batch_size,
        "per_process": {"batch_size": trainer.batch_size,
                        "gradient_accumulation_steps": acc.gradient_accumulation_steps},
        "device": device_info(str(acc.device)),
        "kps_bench_version": __version__, "packages": package_versions(), "git_commit": git_commit(),
        **trainer.extra,
    }
    if acc.is_main_process:
        shutil.rmtree(checkpoint_dir(trainer.work), ignore_errors=True)
        training["files"] = {f: file_sha256(trainer.work / f) for f in files}
        write_json_atomic(trainer.work / TRAINING_JSON, training)
        if trainer.out.exists():
            raise UserError(f"--out '{trainer.out}' appeared while training; the result is kept in '{trainer.work}'.")
        os.replace(trainer.work, trainer.out)
    acc.wait_for_everyone()
    return TrainResult(trainer.out, training)
