"""``kps-bench run --dry-run``: what a run would make and encode, and about how long it would take, without doing it.

The models are loaded and checked as for the run; a short calibration on the run's device times a generation call
of the run's batch at 2 and 4 denoising steps (after one warm-up call) and each encoder on its images. Nothing is
written: not the run folder, not the image cache.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

from .distributed import Ranks, launched
from .encoders import loaded
from .generate import sample, to_image
from .protocol import Generation, Protocol
from .provenance import Timings
from .run import RunOptions, prepare, reference_images


@dataclass(frozen=True)
class Calibration:
    """Seconds measured on the run's device: one generation call of ``batch`` images costs ``call_s + steps *
    step_s``; encoding costs ``encode_s[encoder]`` per image."""

    batch: int
    call_s: float
    step_s: float
    encode_s: dict[str, float]


@dataclass(frozen=True)
class RunPlan:
    """The work of one run: images to generate (``new``) or found in the run folder or the image cache (``reused``),
    per role; images per encoder; distinct prompt texts; and the time the calibration predicts for ``world``
    processes (torchrun / accelerate launch), which are dealt the generation and encoder batches in turn."""

    new: dict[str, int]
    reused: dict[str, int]
    encoder_passes: dict[str, int]
    texts: int
    steps: int
    calibration: Calibration
    world: int = 1

    @property
    def generate_s(self) -> float:
        """The generation calls of the process dealt the most, times the calibrated time of a call."""
        c = self.calibration
        calls = sum(math.ceil(math.ceil(n / c.batch) / self.world) for n in self.new.values())
        return calls * (c.call_s + self.steps * c.step_s)

    @property
    def encode_s(self) -> float:
        """The images encoded, shared by the processes, times the calibrated time of one."""
        return sum(n * self.calibration.encode_s[name] for name, n in self.encoder_passes.items()) / self.world

    def text(self) -> str:
        c = self.calibration
        lines = [f"{role} images: {self.new[role]:,} to generate, {self.reused[role]:,} already made (run folder or "
                 f"image cache)" for role in self.new]
        lines += [f"{name} encoder: {n:,} images" for name, n in self.encoder_passes.items()]
        lines += [f"clip text encoder: {self.texts:,} prompts",
                  f"calibration: {c.call_s:.3g} s per call + {c.step_s:.3g} s per step at batch {c.batch}; "
                  + ", ".join(f"{name} {s * 1e3:.3g} ms per image" for name, s in c.encode_s.items()),
                  f"estimated time: {self.generate_s + self.encode_s:,.1f} s ({self.generate_s:,.1f} s generating, "
                  f"{self.encode_s:,.1f} s encoding; model loading not included)"]
        if self.world > 1:
            lines.append(f"processes: {self.world}, dealt the generation and encoder batches in turn (the estimate "
                         f"assumes each computes as fast as the one calibrated)")
        return "\n".join(lines)


def plan_run(protocol: Protocol, opts: RunOptions) -> RunPlan | None:
    """The plan of ``kps-bench run`` with ``opts``, from its checked inputs and a short calibration. Under
    ``torchrun`` or ``accelerate launch`` rank 0 plans the whole run, on its device, and returns it; the other ranks
    return None (a user error on rank 0 stops them too)."""
    with launched() as ranks:
        return ranks.check(lambda: _plan_run(protocol, opts, ranks) if ranks.main else None)


def _plan_run(protocol: Protocol, opts: RunOptions, ranks: Ranks) -> RunPlan:
    setup = prepare(protocol, opts, Timings(), ranks)
    image_dir = Path(opts.out) / "images"
    new, reused = {}, {}
    for role, jobs in (("base", setup.base_jobs(distinct=True)), ("adapter", setup.adapter_jobs(distinct=True))):
        total = made = 0  # counted as the plan goes: a plan of any size takes little memory
        for j in jobs:
            total += 1
            made += (image_dir / j.filename).is_file() or (role == "base" and setup.cache.entry(j.key).is_file())
        if total:
            new[role], reused[role] = total - made, made
    references = sum(len(reference_images(protocol, s)) for s in setup.subjects)
    images = sum(1 for _ in setup.plan.distinct()) + references
    encoders = loaded(setup.encoders)
    batch = max(1, min(setup.batch_size, max(new.values())))
    return RunPlan(new, reused, {name: images for name, _ in encoders},
                   sum(len(protocol.prompts_for(s)) for s in setup.subjects), protocol.generation.steps,
                   calibrate(setup.base.pipe, encoders, protocol.generation, batch), ranks.world)


def calibrate(pipe, encoders: list[tuple[str, object]], gen: Generation, batch: int) -> Calibration:
    """Time one generation call of ``batch`` images at 2 and 4 steps (after a warm-up call), and each encoder on
    those images (after a warm-up pass)."""
    prompts, seeds = ["a photo"] * batch, list(range(batch))

    def call(steps: int):
        t0 = time.perf_counter()
        _, out = next(sample(pipe, prompts, seeds, dataclasses.replace(gen, steps=steps), batch))
        return time.perf_counter() - t0, out

    call(2)
    two, _ = call(2)
    four, out = call(4)
    call_s, step_s = split_call(two, four)
    images = [to_image(px) for px in out]
    encode = {}
    for name, encoder in encoders:
        encoder.encode_images(images)
        t0 = time.perf_counter()
        encoder.encode_images(images)
        encode[name] = (time.perf_counter() - t0) / len(images)
    return Calibration(batch, call_s, step_s, encode)


def split_call(two: float, four: float) -> tuple[float, float]:
    """(fixed seconds per call, seconds per step) from the times of one call at 2 and at 4 steps. When timing noise
    makes the 4-step call no slower than the 2-step one (a busy machine), the fixed cost cannot be told from the
    steps: the whole 4-step call is counted as steps, which overestimates a run of more steps, never underestimates it."""
    step = (four - two) / 2
    if step <= 0:
        return 0.0, four / 4
    return max(two - 2 * step, 0.0), step
