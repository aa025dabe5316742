"""Checkpoints, so that ``--resume`` continues an interrupted training exactly: accelerate's ``save_state`` and
``load_state`` plus each process's own data generator.

A checkpoint is the folder ``OUT.partial/checkpoints/step-NNNNNNNN``. Every process writes its part into a temporary
folder, and the main process renames it once all have: accelerate's state (optimizer, learning-rate schedule, grad
scaler, and each process's random states in ``random_states_<i>.pkl``), the trained parameters alone
(``trainable.safetensors``, through a save hook: never the frozen base), each process's data generator
(``generator_<i>.pt``) and ``checkpoint.json`` (step, recipe sha256, processes). Only the latest is kept.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from pathlib import Path

from ..errors import UserError
from .recipe import Recipe

WEIGHTS_FILE = "trainable.safetensors"
INFO_FILE = "checkpoint.json"
# in OUT.partial: the run diverged after its last checkpoint, and --resume may change the recipe
DIVERGED_FILE = "diverged.json"


def checkpoint_dir(work: Path) -> Path:
    return work / "checkpoints"


def latest_checkpoint(work: Path) -> Path | None:
    """The newest complete checkpoint folder in ``work`` (``OUT.partial``), if any."""
    folder = checkpoint_dir(work)
    found = sorted(folder.glob("step-*/" + INFO_FILE)) if folder.is_dir() else []
    return found[-1].parent if found else None


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


class Checkpoints:
    """Save and restore one training's state. ``params`` (name -> tensor) are the trained parameters; ``generator``
    is this process's data generator."""

    def __init__(self, work: Path, accelerator, recipe: Recipe, params: dict, generator):
        self.work, self.acc, self.recipe, self.params, self.generator = work, accelerator, recipe, params, generator
        accelerator.register_save_state_pre_hook(self._save_params)
        accelerator.register_load_state_pre_hook(self._load_params)

    @property
    def generator_file(self) -> str:
        return f"generator_{self.acc.process_index}.pt"

    def save(self, step: int) -> None:
        import torch

        acc, folder = self.acc, checkpoint_dir(self.work)
        final, tmp = folder / f"step-{step:08d}", folder / f".tmp-step-{step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        with open(tmp / self.generator_file, "wb") as f:  # a file object: a full disk's OSError stays in the chain
            torch.save(self.generator.get_state(), f)
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / INFO_FILE).write_text(json.dumps({"step": step, "recipe_sha256": self.recipe.sha256,
                                                     "processes": acc.num_processes}) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(folder.glob("step-*"))[:-1]:  # keep the latest only
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def load(self, optimizer, scheduler) -> dict:
        """Restore the latest checkpoint into the prepared ``optimizer`` and ``scheduler``; what was resumed, for
        training.json (empty when there is no checkpoint). After a divergence (``diverged.json``) the recipe may have
        changed: the weights are restored and the new recipe's optimizer and schedule start afresh at that step."""
        import torch
        from accelerate.utils import gather_object

        acc = self.acc
        path = latest_checkpoint(self.work)
        seen = gather_object([path.name if path else "none"])
        if len(set(seen)) > 1:
            raise UserError(f"--resume: the processes see different checkpoints in '{self.work}' "
                            f"({', '.join(f'rank {i}: {s}' for i, s in enumerate(seen))}). Expected every process to "
                            f"see the same OUT.partial: give an --out on a file system that every machine shares.")
        if path is None:
            return {}
        info = json.loads((path / INFO_FILE).read_text())
        if info["processes"] != acc.num_processes:
            raise UserError(f"--resume: the checkpoint in '{path}' was made by {info['processes']} process(es), and "
                            f"this launch has {acc.num_processes}; each process continues its own random stream, so "
                            f"resume with {info['processes']} (e.g. `accelerate launch --num_processes "
                            f"{info['processes']}`), or delete '{self.work}' to start over.")
        changed = info["recipe_sha256"] != self.recipe.sha256
        if changed and not (self.work / DIVERGED_FILE).is_file():
            raise UserError(f"--resume: the checkpoint in '{path}' was made with a different recipe (sha256 "
                            f"{info['recipe_sha256'][:12]}, now {self.recipe.sha256[:12]}). Resume with the same --set "
                            f"values, or delete '{self.work}' to start over.")
        fresh = copy.deepcopy((optimizer.state_dict(), scheduler.state_dict())) if changed else None
        acc.load_state(str(path))
        self.generator.set_state(torch.load(path / self.generator_file, weights_only=True))
        resumed = {"resumed_from_step": info["step"]}
        if changed:
            optimizer.load_state_dict(fresh[0])
            scheduler.load_state_dict(fresh[1])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # stepping the schedule to the checkpoint's step, not training
                for _ in range(info["step"]):
                    scheduler.scheduler.step()
            acc.wait_for_everyone()  # every process has seen diverged.json
            if acc.is_main_process:
                (self.work / DIVERGED_FILE).unlink()
            resumed["recipe_changed_on_resume"] = {"from_recipe_sha256": info["recipe_sha256"], "at_step": info["step"]}
        return resumed

    def mark_diverged(self, step: int) -> int | None:
        """Keep the latest checkpoint for a ``--resume`` with a changed recipe; its step, or None when there is none."""
        from ..rundir import write_json_atomic

        path = latest_checkpoint(self.work)
        if path is None:
            return None
        if self.acc.is_main_process:
            write_json_atomic(self.work / DIVERGED_FILE, {"step": step, "recipe_sha256": self.recipe.sha256})
        return checkpoint_step(path)

    def _save_params(self, models, weights, folder) -> None:
        """accelerate's save hook: the trained parameters instead of whole models."""
        from safetensors.torch import save

        weights.clear()
        if self.acc.is_main_process:
            data = save({k: v.detach().float().cpu().contiguous() for k, v in self.params.items()})
            with open(Path(folder) / WEIGHTS_FILE, "wb") as f:
                f.write(data)

    def _load_params(self, models, folder) -> None:
        """accelerate's load hook: the trained parameters into the models (which accelerate then leaves alone)."""
        import torch
        from safetensors.torch import load_file

        models.clear()
        saved = load_file(str(Path(folder) / WEIGHTS_FILE))
        with torch.no_grad():
            for k, p in self.params.items():
                if k not in saved or saved[k].shape != p.shape:
                    raise UserError(f"--resume: the checkpoint in '{folder}' does not fit the new recipe (parameter "
                                    f"'{k}' changed shape); change only optimisation fields such as learning_rate, or "
                                    f"delete '{self.work}' to start over.")
                p.copy_(saved[k].to(p.device, p.dtype))
