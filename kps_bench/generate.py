"""Seed-paired image generation with a content-addressed, resumable image cache.

Every image has its own ``torch.Generator`` (on the CPU, so latents do not depend on the device
or on the batch it is made in), and a cache key: the sha256 of the model identity, adapter file
hashes, prompt, seed and generation settings. An image whose PNG already exists is never made
again, and each PNG is written to a temporary name and renamed, so a run interrupted at any point
resumes without losing, duplicating or half-writing an image.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Container, Iterable, Iterator

from .distributed import SINGLE, Ranks
from .errors import UserError
from .protocol import Generation, Protocol, Subject, canonical_json, derive_seed, expand_prompt
from .rundir import ImageRecord, atomic_path, readable_image, sha256_file

FLAG_KEY = "kps_flags"


@dataclass(frozen=True)
class Job:
    """One image to make (or find in the cache)."""

    key: str
    role: str  # "base" or "adapter"
    subject: str
    prompt: str
    prompt_without_trigger: str
    has_trigger: bool
    seed: int
    prompt_index: int
    image_index: int

    @property
    def filename(self) -> str:
        return f"{self.key}.png"

    @property
    def id(self) -> str:
        kind = "trigger" if self.has_trigger else "free"
        return f"{self.subject}:{self.role}:{kind}:p{self.prompt_index}:k{self.image_index}"


def cache_key(model: dict, adapter: dict | None, prompt: str, seed: int, gen: Generation, device_type: str,
              speed: tuple[str, ...] = ()) -> str:
    """Content address of one image: everything that determines its pixels (``speed``: the speed flags in use)."""
    material = {
        "model": {k: model.get(k) for k in ("sha256", "hub_id", "revision")},
        "adapter": adapter,
        "prompt": prompt,
        "negative_prompt": gen.negative_prompt,
        "seed": seed,
        "scheduler": gen.scheduler,
        "steps": gen.steps,
        "guidance_scale": gen.guidance_scale,
        "resolution": gen.resolution,
        "dtype": gen.dtype,
        "device": device_type,
        **({"speed": sorted(speed)} if speed else {}),
    }
    return hashlib.sha256(canonical_json(material).encode()).hexdigest()[:32]


def check_plan_size(protocol: Protocol, subjects: list[Subject], with_adapter: bool, image_dir: Path) -> int:
    """Say how many images the run makes, and refuse a plan whose PNGs could not fit on the disk, before any job is
    planned. Returns the number of images."""
    import shutil

    from .ui import console

    g = protocol.generation
    per_seed = 4 if with_adapter else 2  # base and adapter (= base, without one), each on both prompts
    prompts = sum(len(protocol.prompts_for(s)) for s in subjects)
    n = prompts * g.images_per_prompt * per_seed
    most = n * (3 * g.resolution ** 2 + 4096)  # an 8-bit RGB PNG is at most its raw pixels plus headers
    folder = image_dir
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    console.print(f"plan: {n:,} images ({prompts} prompt(s) of {len(subjects)} subject(s) x "
                  f"{g.images_per_prompt} seed(s) x {per_seed}), {g.resolution}x{g.resolution}, at most "
                  f"{most / 1e9:.3g} GB")
    if most > free:
        raise UserError(f"The plan makes {n:,} images of {g.resolution}x{g.resolution} pixels, up to "
                        f"{most / 1e9:.3g} GB, but '{folder}' has {free / 1e9:.3g} GB free. Lower "
                        f"generation.images_per_prompt (now {g.images_per_prompt}), the prompts or the subjects "
                        f"(--set, --subject), or free disk space.")
    return n


@dataclass(frozen=True)
class Plan:
    """The images of a run: base and adapter images on trigger-free and trigger prompts, seed-paired (the base
    model's trigger images are the chance level of identity). Jobs are made as they are asked for, so a plan of any
    size takes little memory."""

    protocol: Protocol
    subjects: list[Subject]
    model: dict
    adapter: dict | None
    device_type: str
    speed: tuple[str, ...] = ()

    def jobs(self) -> Iterator[Job]:
        """Every job, in the run's order: subject, prompt, image, then base trigger-free, base trigger, adapter
        trigger-free, adapter trigger."""
        for s in self.subjects:
            for p in range(len(self.protocol.prompts_for(s))):
                for k in range(self.protocol.generation.images_per_prompt):
                    yield from self._seed_jobs(s, p, k)

    def distinct(self) -> Iterator[Job]:
        """The first job of each distinct image, in the run's order (:meth:`jobs` without the jobs of an image made
        before). Equal keys have equal seeds, hence the same prompt index, so a job is first when its key for image 0
        is first: one key per subject, prompt and role is held, whatever the images per prompt."""
        first: dict[tuple[int, str], tuple[int, int]] = {}
        for i, s in enumerate(self.subjects):
            for p in range(len(self.protocol.prompts_for(s))):
                for r, j in enumerate(self._seed_jobs(s, p, 0)):
                    first.setdefault((p, j.key), (i, r))
        for i, s in enumerate(self.subjects):
            for p in range(len(self.protocol.prompts_for(s))):
                owned = [first[(p, j.key)] == (i, r) for r, j in enumerate(self._seed_jobs(s, p, 0))]
                for k in range(self.protocol.generation.images_per_prompt):
                    yield from (j for j, own in zip(self._seed_jobs(s, p, k), owned) if own)

    def _seed_jobs(self, s: Subject, p: int, k: int) -> list[Job]:
        g = self.protocol.generation
        template = self.protocol.prompts_for(s)[p]
        free = expand_prompt(template, s, with_trigger=False)
        trig = expand_prompt(template, s, with_trigger=True)
        seed = derive_seed(g.seed, p, k)
        return [Job(cache_key(self.model, adapter_id, prompt, seed, g, self.device_type, self.speed), role, s.name,
                    prompt, free, has_trigger, seed, p, k)
                for role, prompt, has_trigger, adapter_id in (("base", free, False, None),
                                                              ("base", trig, True, None),
                                                              ("adapter", free, False, self.adapter),
                                                              ("adapter", trig, True, self.adapter))]


def image_flags(pixels) -> list[str]:
    """Flags of a generated image ``[H, W, 3]`` float array in [0, 1]: ``nan`` and/or ``black``."""
    import numpy as np

    flags = []
    if not np.isfinite(pixels).all():
        flags.append("nan")
    if np.nan_to_num(pixels, nan=0.0).max() < 1.0 / 255.0:
        flags.append("black")
    return flags


def to_image(pixels):
    """``[H, W, 3]`` floats in [0, 1] (NaN as 0) quantised to an 8-bit RGB PIL image."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.nan_to_num(pixels, nan=0.0).clip(0.0, 1.0) * 255.0).round().astype(np.uint8))


def save_png(pixels, path: Path, flags: list[str], info: dict) -> None:
    """Quantise ``[H, W, 3]`` floats in [0, 1] to 8-bit and write atomically, flags in the PNG text chunk."""
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    meta.add_text(FLAG_KEY, ",".join(flags))
    for k, v in info.items():
        meta.add_text(k, str(v))
    with atomic_path(path) as tmp:
        to_image(pixels).save(tmp, format="PNG", pnginfo=meta)


def is_cached(path: Path) -> bool:
    """True when ``path`` holds a readable image; a file that is not (emptied, truncated) is deleted with a warning,
    so it is made again."""
    from .ui import console

    if not path.is_file():
        return False
    if readable_image(path):
        return True
    console.print(f"[yellow]warning:[/] cached image '{path}' is corrupt ({path.stat().st_size} bytes); making it "
                  f"again.")
    path.unlink()
    return False


def read_flags(path: Path) -> list[str]:
    from PIL import Image

    with Image.open(path) as im:
        text = im.text.get(FLAG_KEY, "") if hasattr(im, "text") else ""
    return [f for f in text.split(",") if f]


@contextlib.contextmanager
def oom_guard(what: str, batch_size: int, flag: str):
    """Turn a GPU out-of-memory error into a user error that names the knob to lower."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError(f"GPU out of memory while {what} at batch size {batch_size}. Lower it with {flag} "
                        f"(e.g. {max(1, batch_size // 2)}), or use --dtype float16.") from None


def sample(pipe, prompts: list[str], seeds: list[int], gen: Generation, batch_size: int):
    """Yield ``(start, images)`` for consecutive batches: ``images`` is ``[b, H, W, 3]`` float in [0, 1].

    Image i uses its own CPU ``torch.Generator`` seeded with ``seeds[i]``, so it does not depend on
    ``batch_size`` or on the other prompts of its batch."""
    import torch

    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[i : i + batch_size]]
        with oom_guard("generating images", batch_size, "--batch-size"), torch.inference_mode():
            out = pipe(
                prompt=batch,
                negative_prompt=[gen.negative_prompt] * len(batch) if gen.negative_prompt else None,
                num_inference_steps=gen.steps,
                guidance_scale=gen.guidance_scale,
                height=gen.resolution,
                width=gen.resolution,
                generator=generators,
                output_type="np",
            ).images
        yield i, out


def survey(jobs: Iterable[Job], image_dir: Path) -> tuple[int, frozenset[str]]:
    """Check the images of ``jobs`` (each image once) that ``image_dir`` already holds, deleting a corrupt one (see
    :func:`is_cached`). Returns how many are missing, and the file names of those present."""
    missing, present = 0, set()
    for j in jobs:
        if is_cached(image_dir / j.filename):
            present.add(j.filename)
        else:
            missing += 1
    return missing, frozenset(present)


def missing_batches(jobs: Iterable[Job], image_dir: Path, batch_size: int,
                    present: Container[str] | None = None) -> Iterator[list[Job]]:
    """Consecutive batches of ``batch_size`` jobs whose PNG is not in ``image_dir``, each image once, taken from
    ``jobs`` as they come. The caller has written every batch but the last one it was given when it asks for the next,
    so only that batch's keys (and the batch being filled) are remembered. With ``present`` (file names, see
    :func:`survey`), a job's PNG is missing when its name is not in it, whatever is written meanwhile."""
    batch, recent = [], set()
    for j in jobs:
        if j.key in recent or (j.filename in present if present is not None else is_cached(image_dir / j.filename)):
            continue
        batch.append(j)
        recent.add(j.key)
        if len(batch) == batch_size:
            yield batch
            recent, batch = {done.key for done in batch}, []
    if batch:
        yield batch


def generate(pipe, jobs: Iterable[Job], gen: Generation, image_dir: Path, batch_size: int, progress=None,
             present: Container[str] | None = None, ranks: Ranks = SINGLE) -> int:
    """Make every job's PNG that is not in ``image_dir`` yet, ``batch_size`` images per call, taking the jobs as they
    come (a plan of any size starts at once). Returns how many were made.

    Under a launcher, every rank plans the same batches from the same ``present`` (so what the other ranks write
    meanwhile changes none) and makes its share of them (:meth:`Ranks.mine`): each image is made once, in the batch
    a one-process run makes it in.

    A writer thread saves each batch's PNGs while the next batch is generated, so the device does not wait on the
    disk; a batch's writes finish before the next batch is queued (at most one batch waits in memory, and a write
    error stops the generation)."""
    from concurrent.futures import ThreadPoolExecutor

    assert present is not None or ranks.world == 1, "ranks plan their batches from one survey"
    made, writes = 0, []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kps-bench-png") as writer:
        for batch in ranks.mine(missing_batches(jobs, image_dir, batch_size, present)):
            _, out = next(sample(pipe, [j.prompt for j in batch], [j.seed for j in batch], gen, batch_size))
            for w in writes:
                w.result()
            writes = [writer.submit(save_png, pixels, image_dir / j.filename, image_flags(pixels),
                                    {"prompt": j.prompt, "seed": j.seed})
                      for j, pixels in zip(batch, out)]
            made += len(out)
            if progress is not None:
                progress(len(out))
        for w in writes:
            w.result()
    return made


def job_records(jobs: Iterable[Job], image_dir: Path, run_dir: Path) -> list[ImageRecord]:
    """Manifest rows for generated images (all PNGs must exist)."""
    rows, flags_cache, sha_cache = [], {}, {}
    for j in jobs:
        path = image_dir / j.filename
        if j.key not in sha_cache:
            sha_cache[j.key] = sha256_file(path)
            flags_cache[j.key] = read_flags(path)
        rows.append(ImageRecord(
            id=j.id, path=os.path.relpath(path, run_dir), role=j.role, subject=j.subject, prompt=j.prompt,
            prompt_without_trigger=j.prompt_without_trigger, has_trigger=j.has_trigger, seed=j.seed,
            prompt_index=j.prompt_index, image_index=j.image_index, sha256=sha_cache[j.key],
            flags=list(flags_cache[j.key]),
        ))
    return rows
