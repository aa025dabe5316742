"""The one config layer of protocols and training recipes: search paths, YAML files, ``inherit:``, ``--set`` and
type coercion.

Coercion, the one rule for every typed field of a protocol or a recipe (the field's annotation names the type):

- ``int``: an integer (``true``/``false`` are not integers).
- ``float``: an integer or a number, or a string that reads as one (YAML 1.1 reads ``1e-4``, without a dot, as a
  string); it must be finite.
- ``str``: a string; a number stands for its text (``version: 1.0`` is ``"1.0"``).
- ``bool``: ``true`` or ``false``.
- ``tuple[str, ...]``: a list of strings.

``--set KEY=VALUE`` parses VALUE as YAML (an empty VALUE is the empty string; text YAML cannot parse stays text);
KEY is a dotted path of field names and, inside lists, indices (``subjects.0.trigger``, ``captions.0``).
"""

from __future__ import annotations

import copy
import importlib.resources
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import UserError


@dataclass(frozen=True)
class Kind:
    """A kind of config file and where files of that kind are looked up by name."""

    noun: str  # "protocol"
    env: str  # environment variable of extra folders (os.pathsep-separated), searched first
    folder: str  # folder under the working directory, searched second
    package: str  # package data shipped with kps-bench (the repository's folder of that name), searched last
    holds: str  # what a file's mapping holds, for messages


PROTOCOLS = Kind("protocol", "KPS_BENCH_PROTOCOLS", "protocols", "kps_bench.protocols",
                 "fields (name, version, base_model, ...)")
RECIPES = Kind("recipe", "KPS_BENCH_BASELINES", "baselines", "kps_bench.baselines",
               "hyperparameters (method, steps, learning_rate, ...)")
STUDIES = Kind("validity study", "KPS_BENCH_STUDIES", "studies", "kps_bench.studies",
               "fields (protocol, protocol_overrides, variants)")
SEARCHES = Kind("recipe search", "KPS_BENCH_SEARCHES", "searches", "kps_bench.searches",
                "fields (protocol, protocol_overrides, select, variants)")


def shipped_dir(package: str) -> Path:
    """The folder of files shipped as package data: ``kps_bench.protocols`` (the repository's protocols/),
    ``kps_bench.baselines`` (baselines/), ``kps_bench.studies`` (kps_bench/studies/) or ``kps_bench.searches``
    (kps_bench/searches/), located with
    importlib.resources."""
    return Path(str(importlib.resources.files(package)))


def search_dirs(kind: Kind) -> list[Path]:
    """Where names of ``kind`` are looked up, in order: ``$ENV``, ``./FOLDER``, the shipped package data (existing
    folders, each once)."""
    dirs = [Path(p) for p in os.environ.get(kind.env, "").split(os.pathsep) if p]
    dirs += [Path.cwd() / kind.folder, shipped_dir(kind.package)]
    seen, out = set(), []
    for d in dirs:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def list_files(kind: Kind) -> dict[str, Path]:
    """Name -> file (``NAME.yaml``) over :func:`search_dirs`; earlier folders win."""
    found: dict[str, Path] = {}
    for d in search_dirs(kind):
        for f in sorted(d.glob("*.yaml")):
            found.setdefault(f.stem, f)
    return found


def find_file(kind: Kind, name_or_path: str) -> Path:
    """The file a name (looked up in :func:`search_dirs`) or a path (``.yaml``/``.yml``, or containing a folder
    separator, or an existing file) stands for."""
    p = Path(name_or_path)
    known = list_files(kind)
    names = ", ".join(sorted(known)) or "none"
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path or p.exists():
        if not p.is_file():
            raise UserError(f"{kind.noun.capitalize()} file '{name_or_path}' does not exist. Give a path to a YAML "
                            f"file or a {kind.noun} name (known: {names}).")
        return p
    if name_or_path not in known:
        where = ", ".join(map(str, search_dirs(kind))) or f"./{kind.folder}"
        raise UserError(f"Unknown {kind.noun} '{name_or_path}'. Known {kind.noun}s: {names} (looked in {where}; add "
                        f"folders with ${kind.env}); or give the path to a {kind.noun} YAML file.")
    return known[name_or_path]


def read_mapping(path: Path, kind: Kind) -> dict:
    """The mapping a YAML file of ``kind`` holds; unreadable, non-UTF-8, invalid YAML or not a mapping is a
    UserError naming the file."""
    what = f"{kind.noun.capitalize()} file '{path}'"
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"Cannot read {kind.noun} file '{path}': {e.strerror}.") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} is not UTF-8 text (byte {e.start}: {e.reason}). Give a {kind.noun} YAML file saved "
                        f"as UTF-8.") from None
    except yaml.YAMLError as e:
        raise UserError(f"{what} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{what} must hold a mapping of {kind.holds}, got {type(raw).__name__}.")
    return raw


# ----------------------------------------------------------------------------- inherit:


def resolve_inherit(first: tuple[str, dict], lookup: Callable[[str], tuple[str, dict] | None], known: list[str],
                    noun: str) -> list[tuple[str, dict]]:
    """The layers of ``first`` = (where, mapping) and of what it inherits, root first, without their ``inherit``
    fields. ``lookup(name)`` gives a parent's (where, mapping), or None for an unknown name; ``known`` lists the
    names for the message. An unknown name or a cycle is a UserError naming the file and field."""
    chain = [first]
    while True:
        where, mapping = chain[-1]
        parent = mapping.get("inherit")
        if parent is None:
            break
        if not isinstance(parent, str) or not parent.strip():
            raise UserError(f"{where}: field 'inherit' must be the name of another {noun}, got {parent!r}.")
        found = lookup(parent)
        if found is None:
            raise UserError(f"{where}: field 'inherit' names '{parent}', which is not a known {noun}; expected one "
                            f"of: {', '.join(known) or 'none'}.")
        if found[0] in [w for w, _ in chain]:
            cycle = " -> ".join([w for w, _ in chain] + [found[0]])
            raise UserError(f"{where}: field 'inherit' makes a cycle ({cycle}). Let one of them inherit nothing.")
        chain.append(found)
    return [(w, {k: v for k, v in m.items() if k != "inherit"}) for w, m in reversed(chain)]


# ----------------------------------------------------------------------------- --set


def apply_sets(raw: dict, items, where: str, example: str,
               fields_at: Callable[[list[str]], list[str] | None] = lambda path: None) -> dict:
    """A copy of ``raw`` with every ``--set dotted.key=value`` applied (see the module docstring). ``fields_at(path)``
    lists the fields allowed under a dotted path (None: any); ``example`` shows a good --set."""
    raw = copy.deepcopy(raw)
    for item in items:
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"--set '{item.encode('utf-8', 'backslashreplace').decode()}' is not valid UTF-8 text; "
                            f"give the value as UTF-8.") from None
        if "=" not in item:
            raise UserError(f"--set '{item}' must look like dotted.key=value, e.g. {example}.")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        node: Any = raw
        parts = key.strip().split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            allowed = fields_at(parts[:i])
            if allowed is not None and part not in allowed:
                raise UserError(f"--set {key}: unknown field '{'.'.join(parts[: i + 1])}'. Allowed fields"
                                f"{' of ' + '.'.join(parts[:i]) if i else ''}: {', '.join(allowed)}.")
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UserError(f"--set {key}: '{part}' is not an index of the list at "
                                    f"'{'.'.join(parts[:i])}' in {where} (it has {len(node)} items).")
                if last:
                    node[int(part)] = parsed
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = parsed
                else:
                    node = node.setdefault(part, {})
            else:
                raise UserError(f"--set {key}: '{'.'.join(parts[:i])}' in {where} is a value, not a section.")
    return raw


# ----------------------------------------------------------------------------- coercion

_EXPECTED = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
             "tuple[str, ...]": "a list of strings"}


def coerce(value, type_name: str, path: str, where: str):
    """``value`` as the type a field is annotated with (``int``, ``float``, ``str``, ``bool``, ``tuple[str, ...]``),
    by the module's one rule; otherwise a UserError naming ``where``, the field ``path`` and what was expected."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if type_name == "float":
        if isinstance(value, str):
            try:
                value, number = float(value), True
            except ValueError:
                pass
        if number:
            if not math.isfinite(value):
                raise UserError(f"{where}: field '{path}' must be a finite number, got {value!r}.")
            return float(value)
    elif type_name == "int" and number and isinstance(value, int):
        return value
    elif type_name == "str" and (isinstance(value, str) or number):
        return value if isinstance(value, str) else str(value)
    elif type_name == "bool" and isinstance(value, bool):
        return value
    elif type_name == "tuple[str, ...]" and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise UserError(f"{where}: field '{path}' must be {_EXPECTED[type_name]}, got {value!r} ({type(value).__name__}).")
