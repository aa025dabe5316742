"""The shapes world: a small, fully real text-to-image world that runs on two CPU cores.

Importing this module is cheap (no torch). See ``shapes-world/MODEL_CARD.md``.
"""

from __future__ import annotations

import pathlib

WORLD_DIR = pathlib.Path(__file__).resolve().parent / "shapes-world"
BUILTIN_PREFIX = "builtin:"
WORLD_NAME = "shapes-world"


def is_builtin(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(BUILTIN_PREFIX)


def resolve_builtin(spec: str, default_sub: str = "") -> pathlib.Path:
    """Resolve ``builtin:shapes-world[/<subpath>]`` to a path inside the shipped world.

    ``builtin:shapes-world`` alone resolves to ``WORLD_DIR / default_sub`` (the foundation passes
    ``"pipeline"`` for ``base_model``). Raises ``UserError`` for an unknown builtin or a missing path.
    """
    from kps_bench.errors import UserError

    if not is_builtin(spec):
        raise UserError(f"{spec!r} is not a builtin spec; expected 'builtin:{WORLD_NAME}[/<subpath>]'")
    rest = spec[len(BUILTIN_PREFIX):].strip("/")
    head, _, sub = rest.partition("/")
    if head != WORLD_NAME:
        raise UserError(f"unknown builtin {spec!r}: the only builtin world is 'builtin:{WORLD_NAME}'")
    sub = sub or default_sub
    path = (WORLD_DIR / sub) if sub else WORLD_DIR
    if not path.exists():
        raise UserError(
            f"builtin path {spec!r} resolves to {path}, which does not exist; "
            f"check the subpath or rebuild the world with 'kps-bench world build --out {WORLD_DIR}'"
        )
    return path


def builtin_spec(path: pathlib.Path | str) -> str:
    """The inverse of ``resolve_builtin``: ``builtin:shapes-world/<subpath>`` for a path inside the shipped
    world (so results name it the same way on every machine), else the path itself."""
    p = pathlib.Path(path).resolve()
    if p == WORLD_DIR:
        return f"{BUILTIN_PREFIX}{WORLD_NAME}"
    if WORLD_DIR in p.parents:
        return f"{BUILTIN_PREFIX}{WORLD_NAME}/{p.relative_to(WORLD_DIR).as_posix()}"
    return str(path)


def is_shapes_world(base_model: str | None) -> bool:
    """True when a protocol's base model is the shipped shapes world (or a world folder)."""
    if base_model is None:
        return True
    if is_builtin(base_model):
        return base_model[len(BUILTIN_PREFIX):].strip("/").split("/")[0] == WORLD_NAME
    p = pathlib.Path(base_model)
    return (p / "probe" / "config.json").exists() or (p.parent / "probe" / "config.json").exists()
