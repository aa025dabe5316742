"""Protocols: versioned YAML files that fully determine an evaluation.

A protocol is loaded, overridden with ``--set dotted.key=value`` pairs, validated against the
schema below and hashed; the effective protocol (after overrides) is what results record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import PROTOCOLS, apply_sets, coerce, find_file, read_mapping
from .errors import UserError
from .registry import PROTOCOL_METRICS
SCHEDULERS = ("ddim", "ddpm", "pndm", "lms", "euler", "euler-a", "heun", "dpm-solver", "dpm-solver-sde", "unipc")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Generation:
    """How images are sampled. ``resolution`` in pixels; image k of prompt p uses seed ``derive_seed(seed, p, k)``."""

    scheduler: str = "ddim"
    steps: int = 50
    guidance_scale: float = 7.5
    resolution: int = 512
    images_per_prompt: int = 4
    seed: int = 0
    batch_size: int = 8
    dtype: str = "float32"
    negative_prompt: str = ""


@dataclass(frozen=True)
class ClipSpec:
    """open_clip model: ``arch`` is a model name or a model-config JSON path; ``weights`` a pretrained tag or a file."""

    arch: str = "ViT-B-32"
    weights: str = "openai"


@dataclass(frozen=True)
class DinoSpec:
    """DINO ViT: a hub id or a local transformers model folder."""

    model: str = "facebook/dino-vits16"


@dataclass(frozen=True)
class Encoders:
    clip: ClipSpec = field(default_factory=ClipSpec)
    dino: DinoSpec = field(default_factory=DinoSpec)
    batch_size: int = 64


SUBJECT_SPLITS = ("evaluation", "development")


@dataclass(frozen=True)
class Subject:
    """A personal concept: ``references`` is a folder of its real images; prompts say ``<trigger> <class_noun>``.

    ``split``: ``evaluation`` subjects are what results report by default; ``development`` subjects are
    for choosing training recipes only (``kps-bench run`` and ``demo`` skip them unless named).
    ``prompt_set``: the protocol's ``prompt_sets`` entry the subject's prompts come from (empty: ``prompts``)."""

    name: str
    class_noun: str
    trigger: str
    references: str
    split: str = "evaluation"
    prompt_set: str = ""


@dataclass(frozen=True)
class Bootstrap:
    """95% bootstrap confidence intervals over prompts, with a fixed seed."""

    resamples: int = 1000
    seed: int = 0
    confidence: float = 0.95


@dataclass(frozen=True)
class Protocol:
    """A validated protocol. ``prompts`` is the prompt list of subjects without a ``prompt_set``; ``prompt_sets``
    holds named lists (DreamBench's ``object`` and ``live``). ``references_root``, when set, is the folder that
    subjects' ``references`` are relative to (``$VAR`` expanded); it is recorded but not hashed."""

    name: str
    version: str
    base_model: str
    subjects: tuple[Subject, ...]
    prompts: tuple[str, ...]
    prompt_sets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    references_root: str = ""
    generation: Generation = field(default_factory=Generation)
    encoders: Encoders = field(default_factory=Encoders)
    metrics: tuple[str, ...] = PROTOCOL_METRICS
    bootstrap: Bootstrap = field(default_factory=Bootstrap)
    description: str = ""
    #: Per-method recipe sections read by the trainers (``defaults``, ``lora``, ...); validated by
    #: :func:`kps_bench.train.recipe.load_recipe`.
    training: dict = field(default_factory=dict)
    #: Let training captions equal evaluation prompts (refused otherwise: it leaks the evaluation into training).
    allow_prompt_overlap: bool = False
    #: Folder of the protocol file, against which relative paths in it are resolved.
    source: str = field(default="", compare=False)
    #: The protocol file, for messages ("" when built from a dict).
    file: str = field(default="", compare=False)

    def to_dict(self) -> dict:
        """The effective protocol as plain data (what is recorded). Prompt sets, the references root and
        ``allow_prompt_overlap`` are left out when unused (false), so protocols without them keep their hash."""
        d = dataclasses.asdict(self)
        d.pop("source")
        d.pop("file")
        for key in ("prompt_sets", "references_root", "allow_prompt_overlap"):
            if not d[key]:
                d.pop(key)
        for s in d["subjects"]:
            if not s["prompt_set"]:
                s.pop("prompt_set")
        return d

    @property
    def sha256(self) -> str:
        """Hash of :meth:`to_dict` without ``references_root``: where the data lies is not part of the evaluation
        (each run records its reference images' sha256)."""
        d = self.to_dict()
        d.pop("references_root", None)
        return hashlib.sha256(canonical_json(d).encode()).hexdigest()

    def prompts_for(self, subject: Subject) -> tuple[str, ...]:
        """The subject's prompt templates: its ``prompt_set``, else ``prompts``."""
        return self.prompt_sets[subject.prompt_set] if subject.prompt_set else self.prompts

    def references_dir(self, subject: Subject) -> Path:
        """The subject's reference folder: ``references`` under ``references_root`` when the protocol has one, else
        resolved like any path of the protocol."""
        if not self.references_root:
            folder = Path(self.resolve(subject.references))
            return Path(self.source) / folder if not folder.is_absolute() and self.source else folder
        root = os.path.expandvars(os.path.expanduser(self.references_root))
        unset = re.search(r"\$\{?(\w+)", root)
        if unset:
            raise UserError(f"Protocol '{self.name}': references_root '{self.references_root}' uses the environment "
                            f"variable {unset.group(1)}, which is not set. Set it to the folder that holds one folder per "
                            f"subject, or pass --set references_root=PATH.")
        return Path(self.resolve(root)) / subject.references

    @property
    def evaluation_subjects(self) -> tuple[Subject, ...]:
        """The subjects results report by default (``split: evaluation``)."""
        return tuple(s for s in self.subjects if s.split == "evaluation")

    def subject(self, name: str) -> Subject:
        for s in self.subjects:
            if s.name == name:
                return s
        raise UserError(
            f"Unknown subject '{name}' in protocol '{self.name}'. Known subjects: "
            f"{', '.join(s.name for s in self.subjects)}."
        )

    def resolve(self, spec: str, default_sub: str = "") -> str:
        """A path in the protocol, resolved: ``builtin:WORLD/sub`` -> shipped file, relative -> next to the file.

        Hub ids (``org/name``) and open_clip tags that do not exist as local paths are returned unchanged.
        """
        return resolve_spec(spec, self.source, default_sub)


def resolve_spec(spec: str, base_dir: str = "", default_sub: str = "") -> str:
    if spec.startswith("builtin:"):
        from .world import resolve_builtin

        return str(resolve_builtin(spec, default_sub))
    p = Path(os.path.expanduser(spec))
    if not p.is_absolute() and base_dir:
        candidate = Path(base_dir) / p
        if candidate.exists():
            return str(candidate)
    return str(p) if p.exists() else spec


def check_local_paths(protocol: Protocol) -> None:
    """Every model field that names a local file or folder (a path, not a hub id or open_clip tag) names one that
    exists."""
    fields = {"base_model": (protocol.base_model, "pipeline"),
              "encoders.clip.arch": (protocol.encoders.clip.arch, "clip"),
              "encoders.clip.weights": (protocol.encoders.clip.weights, ""),
              "encoders.dino.model": (protocol.encoders.dino.model, "dino")}
    for name, (spec, sub) in fields.items():
        if not spec or Path(protocol.resolve(spec, sub)).exists():
            continue
        if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or Path(spec).suffix in (
                ".json", ".safetensors", ".bin", ".pt", ".pth", ".ckpt"):
            where = Path(protocol.source) / os.path.expanduser(spec) if protocol.source else Path(spec)
            raise UserError(f"protocol '{protocol.name}': field '{name}' names '{spec}', which does not exist "
                            f"(looked for '{where}'). Fix the path, or give a hub id.")


def expand_prompt(template: str, subject: Subject, with_trigger: bool) -> str:
    """``{subject}`` -> ``"<trigger> <class_noun>"`` (or the class noun alone), ``{class_noun}`` -> class noun."""
    who = f"{subject.trigger} {subject.class_noun}" if with_trigger else subject.class_noun
    return template.replace("{subject}", who).replace("{class_noun}", subject.class_noun)


def derive_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """Seed of image ``image_index`` of prompt ``prompt_index``: a 63-bit hash of the three integers, so < 2**63."""
    return _hash63(f"kps-bench/{seed}/{prompt_index}/{image_index}")


def class_image_seed(seed: int, index: int) -> int:
    """Seed of DreamBooth class image ``index`` for recipe seed ``seed``: a 63-bit hash of both with bit 63 set, so
    in [2**63, 2**64), disjoint from every evaluation seed (:func:`derive_seed` < 2**63) whatever the seeds."""
    return (1 << 63) | _hash63(f"kps-bench/class-images/{seed}/{index}")


def _hash63(text: str) -> int:
    """The first 8 bytes of the SHA-256 of ``text``, little-endian, top bit cleared: an integer in [0, 2**63)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# ----------------------------------------------------------------------------- loading


def load_protocol(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Protocol:
    """Load, override (``dotted.key=value``), validate. Every error names the file, the field and what was expected."""
    path = find_file(PROTOCOLS, name_or_path)
    raw = apply_sets(read_mapping(path, PROTOCOLS), overrides, str(path), "--set generation.steps=25", _fields_at)
    return protocol_from_dict(raw, str(path))


def _fields_at(path: list[str]) -> list[str] | None:
    """The protocol fields allowed under a dotted path (list indices as digits), or None where it is free-form."""
    if not path:
        return _TOP_FIELDS
    if path[0] == "subjects" and len(path) == 2:
        return _field_names(Subject)
    cls = _Top
    for part in path:
        cls = _NESTED.get((cls, part))
        if cls is None:
            return None
    return _field_names(cls)


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "source"]


def _build(cls, data, path: str, where: str):
    """Build dataclass ``cls`` from ``data``, rejecting unknown fields and wrong types."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: field '{path or '<top level>'}' must be a mapping, got {type(data).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        allowed = _TOP_FIELDS if cls is _Top else list(fields)
        raise UserError(f"{where}: unknown field '{_join(path, unknown[0])}'. Allowed fields here: "
                        f"{', '.join(allowed)}.")
    kwargs = {}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for name, f in fields.items():
        fp = _join(path, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{where}: missing required field '{fp}'.")
            continue
        value = data[name]
        sub = _NESTED.get((cls, name))
        if sub is not None:
            kwargs[name] = _build(sub, value, fp, where)
        else:
            kwargs[name] = coerce(value, hints[name], fp, where) if hints[name] in _SCALARS else value
    return cls(**kwargs)


_SCALARS = ("int", "float", "str", "bool")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def protocol_from_dict(raw: dict, where: str = "<protocol>") -> Protocol:
    raw = dict(raw)
    subjects_raw = raw.pop("subjects", None)
    prompts_raw = raw.pop("prompts", None)
    sets_raw = raw.pop("prompt_sets", None)
    metrics_raw = raw.pop("metrics", list(PROTOCOL_METRICS))
    training_raw = raw.pop("training", {}) or {}
    if subjects_raw is None:
        raise UserError(f"{where}: missing required field 'subjects' (a list of {{name, class_noun, trigger, references}}).")
    if not isinstance(subjects_raw, list) or not subjects_raw:
        raise UserError(f"{where}: field 'subjects' must be a non-empty list of {{name, class_noun, trigger, references}}.")
    subjects = tuple(_build(Subject, s, f"subjects.{i}", where) for i, s in enumerate(subjects_raw))
    names = [s.name for s in subjects]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UserError(f"{where}: subject names must be unique; '{sorted(dup)[0]}' appears more than once in 'subjects'.")
    for i, s in enumerate(subjects):
        for fname in ("name", "class_noun", "trigger", "references"):
            if not getattr(s, fname).strip():
                raise UserError(f"{where}: field 'subjects.{i}.{fname}' must be a non-empty string.")
        _require(s.split in SUBJECT_SPLITS, where, f"subjects.{i}.split", f"one of {', '.join(SUBJECT_SPLITS)}",
                 s.split)
    if not any(s.split == "evaluation" for s in subjects):
        raise UserError(f"{where}: field 'subjects' has no subject with split 'evaluation'; at least one is needed.")
    if prompts_raw is None and sets_raw is None:
        raise UserError(f"{where}: missing required field 'prompts' (a list of templates using {{subject}}), or "
                        f"'prompt_sets' (named lists of templates that subjects pick with 'prompt_set').")
    prompts = _templates(prompts_raw, "prompts", where) if prompts_raw is not None else ()
    if sets_raw is not None and (not isinstance(sets_raw, dict) or not sets_raw):
        raise UserError(f"{where}: field 'prompt_sets' must be a non-empty mapping of set name -> list of templates, "
                        f"e.g. {{object: [\"a {{subject}} in the snow\"], live: [...]}}.")
    prompt_sets = {str(k): _templates(v, f"prompt_sets.{k}", where) for k, v in (sets_raw or {}).items()}
    for i, s in enumerate(subjects):
        if s.prompt_set and s.prompt_set not in prompt_sets:
            raise UserError(f"{where}: field 'subjects.{i}.prompt_set' is '{s.prompt_set}', which is not in "
                            f"'prompt_sets'; expected one of: {', '.join(prompt_sets) or 'none (there are no prompt_sets)'}.")
        if not s.prompt_set and not prompts:
            raise UserError(f"{where}: field 'subjects.{i}.prompt_set' is required because the protocol has no "
                            f"'prompts' list; expected one of: {', '.join(prompt_sets)}.")
    if not isinstance(metrics_raw, list) or not all(isinstance(m, str) for m in metrics_raw):
        raise UserError(f"{where}: field 'metrics' must be a list of metric names from: {', '.join(PROTOCOL_METRICS)}.")
    bad = [m for m in metrics_raw if m not in PROTOCOL_METRICS]
    if bad:
        raise UserError(f"{where}: field 'metrics' has unknown metric '{bad[0]}'; expected names from: {', '.join(PROTOCOL_METRICS)}.")
    if not isinstance(training_raw, dict):
        raise UserError(f"{where}: field 'training' must be a mapping of method -> recipe overrides.")
    top = _build(_Top, raw, "", where)
    g = top.generation
    _require(g.scheduler in SCHEDULERS, where, "generation.scheduler", f"one of {', '.join(SCHEDULERS)}", g.scheduler)
    _require(g.dtype in DTYPES, where, "generation.dtype", f"one of {', '.join(DTYPES)}", g.dtype)
    for name in ("steps", "resolution", "images_per_prompt", "batch_size"):
        _require(getattr(g, name) >= 1, where, f"generation.{name}", "an integer >= 1", getattr(g, name))
    _require(g.resolution % 8 == 0, where, "generation.resolution", "a multiple of 8", g.resolution)
    _require(g.guidance_scale >= 0, where, "generation.guidance_scale", "a number >= 0", g.guidance_scale)
    _require(top.encoders.batch_size >= 1, where, "encoders.batch_size", "an integer >= 1", top.encoders.batch_size)
    b = top.bootstrap
    _require(b.resamples >= 1, where, "bootstrap.resamples", "an integer >= 1", b.resamples)
    _require(0 < b.confidence < 1, where, "bootstrap.confidence", "a number between 0 and 1", b.confidence)
    _require(bool(top.name.strip()), where, "name", "a non-empty string", top.name)
    _require(bool(top.version.strip()), where, "version", "a non-empty string", top.version)
    _require(bool(top.base_model.strip()), where, "base_model", "a hub id, a local diffusers folder or builtin:NAME", top.base_model)
    return Protocol(
        name=top.name, version=top.version, base_model=top.base_model, subjects=subjects,
        prompts=prompts, prompt_sets=prompt_sets, references_root=top.references_root, generation=g,
        encoders=top.encoders, metrics=tuple(metrics_raw), bootstrap=b, description=top.description,
        training=training_raw, allow_prompt_overlap=top.allow_prompt_overlap,
        source=str(Path(where).resolve().parent) if os.path.exists(where) else "",
        file=where if os.path.exists(where) else "",
    )


def _templates(raw, path: str, where: str) -> tuple[str, ...]:
    """A non-empty list of prompt templates, each containing ``{subject}``."""
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{where}: field '{path}' must be a non-empty list of templates such as \"a photo of a {{subject}}\".")
    for i, p in enumerate(raw):
        if not isinstance(p, str) or "{subject}" not in p:
            raise UserError(f"{where}: field '{path}.{i}' must be a string containing '{{subject}}', got {p!r}.")
    return tuple(raw)


def _require(ok: bool, where: str, path: str, expected: str, got) -> None:
    if not ok:
        raise UserError(f"{where}: field '{path}' must be {expected}, got {got!r}.")


@dataclass(frozen=True)
class _Top:
    """The scalar and nested top-level fields (subjects, prompts, prompt sets, metrics are validated by hand)."""

    name: str
    version: str
    base_model: str
    references_root: str = ""
    generation: Generation = field(default_factory=Generation)
    encoders: Encoders = field(default_factory=Encoders)
    bootstrap: Bootstrap = field(default_factory=Bootstrap)
    description: str = ""
    allow_prompt_overlap: bool = False


#: Every top-level field: the dataclass ones and those validated by hand in protocol_from_dict.
_TOP_FIELDS = ["name", "version", "description", "base_model", "generation", "encoders", "subjects", "prompts",
               "prompt_sets", "references_root", "metrics", "bootstrap", "training", "allow_prompt_overlap"]

_NESTED = {
    (_Top, "generation"): Generation,
    (_Top, "encoders"): Encoders,
    (_Top, "bootstrap"): Bootstrap,
    (Encoders, "clip"): ClipSpec,
    (Encoders, "dino"): DinoSpec,
}
