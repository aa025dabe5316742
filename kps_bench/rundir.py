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
import re
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError

ROLES = ("reference", "base", "adapter")
MANIFEST = "images.jsonl"
EMBEDDINGS = "embeddings.safetensors"
RESULTS = "results.json"


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


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())
#: ``.NAME.w<pid>@<host>.<random>.tmp<suffix>``: the writer of a temporary, so that its death can be told.
_TEMPORARY = re.compile(r"\.w(\d+)@([A-Za-z0-9-]+)\.[^.]+\.tmp[^/]*$")


def temporary_prefix(path: Path) -> str:
    """Name prefix for a temporary that becomes ``path``, tagged with this process's PID and host."""
    return f".{path.name}.w{os.getpid()}@{_HOST}."


def _writer_is_dead(name: str) -> bool:
    """The temporary ``name`` was written by a process of this host that no longer runs."""
    m = _TEMPORARY.search(name)
    if not m or m[2] != _HOST or int(m[1]) == os.getpid():
        return False
    try:
        os.kill(int(m[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def temporary_path(path: Path) -> Path:
    """A new name next to ``path`` for a temporary that becomes it: ``.NAME.w<pid>@<host>.<uuid>.tmp<suffix>`` (the
    writer tagged, the suffix kept for writers that read the format from it)."""
    return path.with_name(f"{temporary_prefix(path)}{uuid.uuid4().hex}.tmp{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a :func:`temporary_path` of ``path``; rename it onto ``path`` only if the block succeeds. The temporary
    is created empty with the mode a plain open() gives (0666 less the umask, not mkstemp's 0600), so that co-authors
    on a shared cluster can read the results."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(path: str | os.PathLike, flag: str = "--out", is_file: bool = False) -> None:
    """Before any work starts: ``path`` (a folder, or a file with ``is_file``) can be created and written. Probes
    the nearest existing folder with a temporary file, which is removed again."""
    target = Path(path).expanduser()
    folder = target.parent if is_file else target
    if is_file and target.is_dir():
        raise UserError(f"{flag} '{path}' is a folder; give a file name.")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} '{path}': '{existing}' is a file, not a folder. Choose another {flag}.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".kps-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} '{path}' cannot be written: {e.strerror} in '{existing}'. Choose a folder you can "
                        f"write to, or fix its permissions.") from None


def remove_stale_temporaries(folder: Path, older_than_s: float = 0.0) -> int:
    """Delete the temporary files (``.NAME.*.tmp*``) that a killed writer left in ``folder``: every one (for a folder
    under its lock); else those whose writer (named in the file name) was a process of this host that has ended, and
    those created (or hard-linked) more than ``older_than_s`` seconds ago, so that a live writer's stay. Returns how
    many."""
    cutoff, removed = time.time() - older_than_s, 0
    for p in folder.glob(".*.tmp*") if folder.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):  # renamed into place by its writer meanwhile
            if p.is_file() and (not older_than_s or _writer_is_dead(p.name) or p.stat().st_ctime < cutoff):
                p.unlink()
                removed += 1
    return removed


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=True) + "\n")


def readable_image(path: str | os.PathLike) -> bool:
    """True when ``path`` opens and verifies as an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- manifest


def write_run(out: Path, records: Iterable[ImageRecord], tensors: dict, results: dict) -> None:
    """Write ``images.jsonl``, ``embeddings.safetensors`` and ``results.json`` as one unit: all three to temporary
    names, then renamed, ``results.json`` last. ``results["files"]`` records the sha256 of the other two, so a
    folder interrupted between the renames is detected by :func:`check_run_files`."""
    from safetensors.torch import save_file

    with atomic_path(out / RESULTS) as res, atomic_path(out / EMBEDDINGS) as emb, atomic_path(out / MANIFEST) as man:
        lines = [json.dumps(dataclasses.asdict(r), ensure_ascii=False) for r in records]
        man.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
        save_file({k: v.detach().float().cpu().clone() for k, v in tensors.items()}, str(emb))
        results["files"] = {MANIFEST: sha256_file(man), EMBEDDINGS: sha256_file(emb)}
        res.write_text(json.dumps(results, indent=2, ensure_ascii=False, allow_nan=True) + "\n", encoding="utf-8")


def check_run_files(run_dir: Path, results: dict) -> None:
    """Refuse a run folder whose images.jsonl or embeddings differ from those its results.json was computed from
    (a run or score interrupted while writing them)."""
    for name, sha in (results.get("files") or {}).items():
        f = run_dir / name
        if not f.is_file() or sha256_file(f) != sha:
            raise UserError(f"Run folder '{run_dir}' is inconsistent: its {name} is not the one its {RESULTS} was "
                            f"computed from (a run or score was interrupted while writing them). Re-run the same "
                            f"`kps-bench run` or `kps-bench score` command into it to make it whole again.")


_FIELDS = {f.name for f in dataclasses.fields(ImageRecord)}
_REQUIRED = ("id", "path", "role", "subject")
#: Field -> (accepted JSON type, what the error says); None is accepted for the optional fields.
_FIELD_TYPES = {
    "id": (str, "a non-empty string"), "path": (str, "a string (a path relative to the manifest's folder)"),
    "role": (str, "a string"), "subject": (str, "a string"), "prompt": (str, "a string"),
    "prompt_without_trigger": (str, "a string"), "has_trigger": (bool, "true or false (a JSON boolean)"),
    "seed": (int, "an integer"), "prompt_index": (int, "an integer"), "image_index": (int, "an integer"),
    "sha256": (str, "a string"), "flags": (list, "a list of strings"),
}


def read_manifest(path: str | os.PathLike) -> list[ImageRecord]:
    """Read ``images.jsonl``. Unknown keys are ignored; missing ``prompt_index`` is derived per subject."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Manifest '{path}' does not exist. Give the images.jsonl of a run directory "
                        f"(one JSON object per line with id, path, role, subject, prompt, ...).")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"Manifest '{path}' is not UTF-8 text (byte {e.start}: {e.reason}). It must be a JSON-lines "
                        f"file: one JSON object per line with id, path, role, subject, ...") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {n}: not valid JSON ({e.msg}). Each line must be one JSON object.") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}, line {n}: must be a JSON object with id, path, role, subject, ...; got a "
                            f"{type(obj).__name__}.")
        missing = [k for k in _REQUIRED if k not in obj]
        if missing:
            raise UserError(f"{path}, line {n}: missing field '{missing[0]}' (every line needs id, path, role, subject).")
        if obj["role"] not in ROLES:
            raise UserError(f"{path}, line {n}: field 'role' must be one of {', '.join(ROLES)}, got {obj['role']!r}.")
        if obj["role"] != "reference" and obj.get("prompt_without_trigger") is None:
            raise UserError(f"{path}, line {n}: a {obj['role']} image needs 'prompt_without_trigger' "
                            f"(the prompt with '<trigger> <class>' replaced by '<class>').")
        for key, (kind, expected) in _FIELD_TYPES.items():
            value = obj.get(key)
            if (value is not None or key in _REQUIRED) and (not isinstance(value, kind) or (
                    kind is not bool and isinstance(value, bool))):
                raise UserError(f"{path}, line {n}: field '{key}' must be {expected}, got {value!r}.")
        empty = [k for k in ("id", "path", "subject") if not obj[k].strip()]
        if empty:
            raise UserError(f"{path}, line {n}: field '{empty[0]}' must be a non-empty string.")
        if obj.get("sha256") is not None and not re.fullmatch(r"[0-9a-f]{64}", obj["sha256"]):
            raise UserError(f"{path}, line {n}: field 'sha256' must be 64 lowercase hex digits, got {obj['sha256']!r}.")
        if not all(isinstance(f, str) for f in obj.get("flags") or []):
            raise UserError(f"{path}, line {n}: field 'flags' must be a list of strings (nan, black).")
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
