"""The names ``kps_bench/world/check.py`` imports from here; the trainer core itself is split into ``recipe``,
``data``, ``trainer``, ``checkpoint`` and ``output``. Import from those (or :mod:`kps_bench.train`)."""

from .output import partial_dir
from .recipe import load_recipe

__all__ = ["load_recipe", "partial_dir"]
