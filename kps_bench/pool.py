"""Independent jobs spread over the visible devices: the trainings and evaluations of a leaderboard, one per (method,
subject), as ``kps-bench demo --jobs N`` runs them.

Each worker is a process of its own (spawned: it inherits no CUDA state) that sees one GPU through
``CUDA_VISIBLE_DEVICES``, or computes on the CPU, and runs one job at a time, its output going to the job's log file.
A job runs the same code with the same seeds as in one process, so its files are those of a sequential run.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import UserError
from .ui import console


def worker_gpus(device: str, jobs: int | None) -> list[str | None]:
    """The GPU that each worker sees (its ``CUDA_VISIBLE_DEVICES`` entry), or None for a CPU worker, for ``--device``
    and ``--jobs`` (None: one worker per visible GPU for CUDA, else one). Several workers may share a GPU when
    ``jobs`` exceeds the GPUs."""
    from .models import resolve_device

    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs {jobs}: give how many jobs run at once, 1 or more (default: one per visible GPU, 1 "
                        f"on the CPU).")
    device = resolve_device(device)
    if device != "cuda":
        if (jobs or 1) > 1 and device != "cpu":
            raise UserError(f"--jobs {jobs} with --device {device}: the jobs would share that one device. Give "
                            f"--device cuda to spread them over the visible GPUs (choose them with "
                            f"CUDA_VISIBLE_DEVICES), --device cpu, or --jobs 1.")
        return [None] * (jobs or 1)
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = listed.split(",") if listed else [str(i) for i in range(torch.cuda.device_count())]
    return [gpus[i % len(gpus)] for i in range(jobs or len(gpus))]


@dataclass(frozen=True)
class Task:
    """One job: ``fn(*args)`` in a worker (both picklable), its output written to ``log``."""

    name: str
    fn: Callable
    args: tuple
    log: Path


class Running:
    """A submitted task; :meth:`result` waits for it."""

    def __init__(self, task: Task, future: concurrent.futures.Future):
        self.task, self.future = task, future

    def result(self):
        """The task's value; its error, naming the task and its log, when it failed."""
        try:
            return self.future.result()
        except UserError as e:
            raise UserError(f"{e} ({self.task.name}; its log: {self.task.log})") from None
        except concurrent.futures.CancelledError:
            raise
        except Exception as e:
            raise RuntimeError(f"{self.task.name} failed ({type(e).__name__}: {e}); its log: {self.task.log}") from e


class Pool:
    """Workers pinned to ``gpus`` (see :func:`worker_gpus`), one task at a time each. Leaving the block waits for
    the running tasks; after an error, the queued ones are cancelled."""

    def __init__(self, gpus: list[str | None]):
        context = multiprocessing.get_context("spawn")
        free = context.Queue()
        for gpu in gpus:
            free.put(gpu)
        self._executor = concurrent.futures.ProcessPoolExecutor(len(gpus), mp_context=context, initializer=_pin,
                                                                initargs=(free,))

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, kind, error, tb) -> None:
        self._executor.shutdown(wait=True, cancel_futures=error is not None)

    def submit(self, task: Task) -> Running:
        future = self._executor.submit(_run, task)
        future.add_done_callback(lambda f: f.cancelled() or console.print(
            f"{task.name}: {'failed' if f.exception() else 'done'} (log: {task.log})"))
        return Running(task, future)


#: The GPU this worker sees (None: a CPU worker, or not a worker).
_GPU: str | None = None


def _pin(free) -> None:
    """A worker's start: take a GPU of its own (before anything uses CUDA)."""
    global _GPU
    _GPU = free.get()
    if _GPU is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = _GPU


def _run(task: Task):
    """In a worker: ``task.fn(*task.args)``, with stdout and stderr in ``task.log``."""
    task.log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(task.log, "w", encoding="utf-8") as log:
        log.write(f"# {task.name}, started {time.strftime('%Y-%m-%d %H:%M:%S')} on "
                  f"{'CPU' if _GPU is None else f'GPU {_GPU}'}\n")
        log.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            return task.fn(*task.args)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
