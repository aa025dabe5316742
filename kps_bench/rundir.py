"""The run directory: a documented, stable on-disk format that other tools can read.

::

    RUN_DIR/
      images/                  PNGs, named by their content-addressed cache key
      images.jsonl             one ImageRecord per line
      embeddings.safetensors   clip/<id>, dino/<id> (L2-normalised float32 [d]); clip_text/<subject>/<prompt_index>
      results.json             metrics per subject and overall, plus provenance

Every file is written to a temporary name in the same folder and then renamed, so an interrupted
run never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError

ROLES = ("reference", "base", "adapter")


@dataclass
class ImageRecord:
    """One line of ``images.jsonl``. ``path`` is relative to the run directory (or absolute)."""

    id: str
    path: str
    role: str
    subject: str
    prompt: str | None = None
    prompt_without_trigger: str | None = None
    has_trigger: bool = False
    seed: int | None = None
    prompt_index: int | None = None
    image_index: int | None = None
    sha256: str | None = None
    #: Problems found in the pixels ("nan", "black"); flagged images are left out of every metric and counted.
    flags: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.flags


# ----------------------------------------------------------------------------- atomic files


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=True) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- manifest


def write_manifest(path: str | os.PathLike, records: Iterable[ImageRecord]) -> None:
    lines = [json.dumps(dataclasses.asdict(r), ensure_ascii=False) for r in records]
    write_text_atomic(path, "\n".join(lines) + ("\n" if lines else ""))


_FIELDS = {f.name for f in dataclasses.fields(ImageRecord)}


def read_manifest(path: str | os.PathLike) -> list[ImageRecord]:
    """Read ``images.jsonl``. Unknown keys are ignored; missing ``prompt_index`` is derived per subject."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Manifest '{path}' does not exist. Give the images.jsonl of a run directory "
                        f"(one JSON object per line with id, path, role, subject, prompt, ...).")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {n}: not valid JSON ({e.msg}). Each line must be one JSON object.") from None
        missing = [k for k in ("id", "path", "role", "subject") if k not in obj]
        if missing:
            raise UserError(f"{path}, line {n}: missing field '{missing[0]}' (every line needs id, path, role, subject).")
        if obj["role"] not in ROLES:
            raise UserError(f"{path}, line {n}: field 'role' must be one of {', '.join(ROLES)}, got {obj['role']!r}.")
        if obj["role"] != "reference" and obj.get("prompt_without_trigger") is None:
            raise UserError(f"{path}, line {n}: a {obj['role']} image needs 'prompt_without_trigger' "
                            f"(the prompt with '<trigger> <class>' replaced by '<class>').")
        records.append(ImageRecord(**{k: v for k, v in obj.items() if k in _FIELDS}))
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"{path}: image id '{dup}' appears more than once; ids must be unique.")
    _fill_prompt_index(records)
    return records


def _fill_prompt_index(records: list[ImageRecord]) -> None:
    """Subjects whose images lack ``prompt_index`` get one per distinct trigger-free prompt, in order of appearance."""
    for subject in {r.subject for r in records}:
        rows = [r for r in records if r.subject == subject and r.role != "reference"]
        if all(r.prompt_index is not None for r in rows):
            continue
        order: dict[str, int] = {}
        for r in rows:
            r.prompt_index = order.setdefault(r.prompt_without_trigger, len(order))


def resolve_image_path(run_dir: str | os.PathLike, record: ImageRecord) -> Path:
    p = Path(record.path)
    return p if p.is_absolute() else Path(run_dir) / p


# ----------------------------------------------------------------------------- embeddings


def save_embeddings(path: str | os.PathLike, tensors: dict) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().float().cpu().clone() for k, v in tensors.items()}, str(tmp))


def load_embeddings(path: str | os.PathLike) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"Embeddings file '{path}' does not exist; run `kps-bench score` to compute it.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"Embeddings file '{path}' is not a readable safetensors file ({e}); delete it and rescore.") from None
