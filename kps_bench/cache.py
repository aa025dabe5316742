"""The image cache shared by every run: base images are made once per protocol setting, whatever the method.

An entry is a PNG named by its content address (:func:`kps_bench.generate.cache_key`: base model and its revision or
weights hash, scheduler, steps, guidance, resolution, dtype, negative prompt, prompt, seed, device type), under
``$KPS_BENCH_CACHE`` (default ``~/.cache/kps-bench``) or ``--cache-dir``. Run folders stay self-contained: an entry is
hard-linked into the run's ``images/`` (copied when the two are on different file systems). Every write goes to a
temporary name and is renamed into place, so two processes writing one entry leave one intact file. The cache has no
lock: a temporary that a killed writer left is removed by a later run at once when its writer (PID and host, in its
name) was a process of the same host that has ended, else once it is an hour old.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .generate import Job, is_cached
from .rundir import check_writable, remove_stale_temporaries, temporary_path

ENV = "KPS_BENCH_CACHE"
#: A cache temporary older than this (seconds since it was created or linked) was left by a killed writer.
STALE_TEMPORARY_S = 3600


def default_cache_dir() -> Path:
    """``$KPS_BENCH_CACHE``, else ``~/.cache/kps-bench``."""
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "kps-bench").expanduser()


def link_or_copy(src: Path, dest: Path) -> None:
    """Put ``src``'s bytes at ``dest`` atomically: a hard link when the file system allows it, else a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(dest)
    try:
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class ImageCache:
    """A folder of content-addressed images shared across runs."""

    root: Path

    @classmethod
    def open(cls, root: Path | None = None) -> ImageCache:
        """The cache at ``root`` (default: :func:`default_cache_dir`), checked writable before any work starts."""
        root = Path(root).expanduser() if root is not None else default_cache_dir()
        check_writable(root, f"--cache-dir (or ${ENV})")
        return cls(root)

    def remove_stale_temporaries(self) -> int:
        """Delete the temporaries that killed writers left anywhere in the cache: at once where the writer was a
        process of this host that has ended, else over :data:`STALE_TEMPORARY_S` ago; returns how many."""
        return sum(remove_stale_temporaries(d, STALE_TEMPORARY_S) for d in self.root.glob("**/"))

    def entry(self, key: str) -> Path:
        return self.root / "images" / key[:2] / f"{key}.png"

    def take(self, jobs: Iterable[Job], image_dir: Path) -> int:
        """Link the cached images of ``jobs`` that ``image_dir`` lacks into it; returns how many were taken."""
        taken = 0
        for j in jobs:
            if not (image_dir / j.filename).is_file() and is_cached(self.entry(j.key)):
                link_or_copy(self.entry(j.key), image_dir / j.filename)
                taken += 1
        return taken

    def keep(self, jobs: Iterable[Job], image_dir: Path) -> int:
        """Add the images of ``jobs`` in ``image_dir`` that the cache lacks (or holds corrupt: a run folder's image
        edited in place also edits its hard-linked entry) to it; returns how many were added."""
        kept = 0
        for j in jobs:
            if (image_dir / j.filename).is_file() and not is_cached(self.entry(j.key)):
                link_or_copy(image_dir / j.filename, self.entry(j.key))
                kept += 1
        return kept
