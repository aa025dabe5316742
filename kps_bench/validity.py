"""``kps-bench validate``: the metric-validity study. Do the benchmark's metrics rank adapters as the shapes world's
ground truth does?

A study file (``kps_bench/studies/NAME.yaml``, or ``./studies``, ``$KPS_BENCH_STUDIES``, or a path) names a protocol
(with ``protocol_overrides``) and adapter *variants*: a training method and recipe overrides (``set``). Every variant
is trained on each of the protocol's evaluation subjects (``OUT/adapters/VARIANT/SUBJECT``) and the protocol is run on
each adapter (``OUT/runs/VARIANT/SUBJECT``) and once without adapter (``OUT/runs/base``), with the machinery of
``kps-bench demo``: finished adapters and runs are reused, interrupted trainings resume. The base model is one more
adapter of the study. An adapter's value of a metric or of a ground truth is its mean over the subjects, as in a
leaderboard row.

Ground truth per subject, from ``kps-bench world truth`` (stored in every shapes-world run): ``gt_identity`` (true
identity), ``gt_preservation`` = 1 - true knowledge shift, ``gt_kps`` = their harmonic mean, ``gt_diversity_ratio``,
and ``gt_trigger_shape_rate`` (share of trigger images that show the subject's class: the part of prompt fidelity the
probe sees, the truth of ``clip_t``).

Statistics, over the adapters: per metric of :data:`PAIRS`, Spearman's rho against its truth with a percentile
bootstrap CI (adapters drawn with replacement, the same draws for every metric, so differences are paired). The
decision rule, stated in advance: the leaderboard's primary column is whichever of ``kps`` and ``kps_gain`` has the
higher rho against ``gt_kps`` (a tie keeps ``kps``). Targets: the primary score and the preservation family reach rho
>= 0.8, ``diversity_ratio`` rho >= 0.7, and each adapter's (variant and subject) diversity_ratio 95% CI has a
half-width <= 0.15.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .config import STUDIES, Kind, find_file, read_mapping
from .errors import UserError
from .protocol import Protocol, load_protocol

#: (benchmark metric, the ground truth it claims to measure), in table order.
PAIRS = (("kps", "gt_kps"), ("kps_gain", "gt_kps"), ("identity", "gt_identity"), ("identity_gain", "gt_identity"),
         ("clip_i", "gt_identity"), ("dino", "gt_identity"), ("clip_t", "gt_trigger_shape_rate"),
         ("preservation", "gt_preservation"), ("preservation_gain", "gt_preservation"),
         ("diversity_ratio", "gt_diversity_ratio"), ("vendi_ratio", "gt_diversity_ratio"))
#: The candidates of the primary column, the first kept on a tie; and the rho the chosen one must reach.
PRIMARY_CANDIDATES = ("kps", "kps_gain")
PRIMARY_TARGET = 0.8
#: The rho other metrics must reach against their truth.
TARGETS = {"preservation": 0.8, "preservation_gain": 0.8, "diversity_ratio": 0.7}
#: The largest half-width of one adapter's diversity_ratio 95% CI.
DIVERSITY_HALF_WIDTH = 0.15
#: The name of the base model's adapter (and run folder).
BASE = "base"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_STUDY_FIELDS = ("protocol", "protocol_overrides", "variants")
_VARIANT_FIELDS = ("name", "method", "set")


@dataclass(frozen=True)
class Variant:
    """One adapter recipe of a study: ``method`` with the protocol's recipe, then ``overrides`` (``--set`` items of
    the recipe, e.g. ``steps=150``)."""

    name: str
    method: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Study:
    """A validated study file: the protocol (name or path) with its overrides, and the variants."""

    file: str
    sha256: str
    protocol: str
    protocol_overrides: tuple[str, ...]
    variants: tuple[Variant, ...]


@dataclass
class ValidityOptions:
    """What ``kps-bench validate`` was asked to do beyond the study file."""

    out: Path = Path("kps-bench-validity")
    study: str = "shapes-world"
    #: The protocol instead of the study's (None: the study's), and overrides after the study's.
    protocol: str | None = None
    protocol_overrides: tuple[str, ...] = ()
    #: Subjects (default: the protocol's evaluation subjects).
    subjects: tuple[str, ...] = ()
    device: str = "auto"
    cache_dir: Path | None = None
    resamples: int = 1000
    seed: int = 0
    confidence: float = 0.95


@dataclass
class Adapter:
    """One adapter of the study (a variant on every subject, or the base model). ``subjects``: per subject, its
    metric and ground-truth values; ``values``: their means over the subjects; ``half_widths``: per subject, the
    half-width of the diversity_ratio CI; ``seconds``: training and run time recorded in its folders."""

    name: str
    method: str
    overrides: tuple[str, ...]
    runs: list[str]
    subjects: dict[str, dict[str, float]]
    values: dict[str, float]
    half_widths: dict[str, float] = field(default_factory=dict)
    recipe_sha256: dict[str, str] = field(default_factory=dict)
    train_seconds: float = 0.0
    run_seconds: float = 0.0


@dataclass(frozen=True)
class Correlation:
    """Spearman's rho of ``metric`` against ``truth`` over ``n`` adapters (those where both are defined), with its
    bootstrap interval; ``target``: the rho it must reach (None: none)."""

    metric: str
    truth: str
    rho: float
    ci_low: float
    ci_high: float
    n: int
    target: float | None = None

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.rho >= self.target

    @property
    def shortfall(self) -> float | None:
        """How far rho falls short of the target (0 when met; NaN when rho is undefined)."""
        if self.target is None:
            return None
        return max(0.0, self.target - self.rho) if self.rho == self.rho else math.nan


@dataclass(frozen=True)
class Decision:
    """The primary column and the evidence: each candidate's rho against gt_kps, and the paired difference (second
    candidate minus first) with its bootstrap interval over the ``n`` adapters where all are defined."""

    primary: str
    rho: dict[str, float]
    difference: float
    ci_low: float
    ci_high: float
    n: int


@dataclass
class ValidityResult:
    """A finished study: what was asked, the adapters read from their runs, the statistics, and the seconds this
    invocation took."""

    options: ValidityOptions
    study: Study
    protocol: Protocol
    subjects: list[str]
    adapters: list[Adapter]
    correlations: list[Correlation]
    decision: Decision | None
    seconds: float
    start_time: str

    @property
    def out(self) -> Path:
        return Path(self.options.out)

    @property
    def protocol_overrides(self) -> tuple[str, ...]:
        return self.study.protocol_overrides + tuple(self.options.protocol_overrides)

    @property
    def summary(self) -> str:
        return summary_text(self)


# ----------------------------------------------------------------------------- study files


def load_study(name_or_path: str) -> Study:
    """Read and check a study file; every error names the file, the field and what is expected."""
    path, raw, protocol, overrides = read_with_protocol(STUDIES, name_or_path, _STUDY_FIELDS)
    where = str(path)
    raw_variants = raw.get("variants")
    if not isinstance(raw_variants, list) or len(raw_variants) < 2:
        got = f"{len(raw_variants)} adapter(s)" if isinstance(raw_variants, list) else repr(raw_variants)
        raise UserError(f"{where}: field 'variants' must list at least 2 adapters to train (a rank correlation over "
                        f"them and the base model needs 3 points), got {got}.")
    return Study(where, hashlib.sha256(path.read_bytes()).hexdigest(), protocol, overrides,
                 parse_variants(raw_variants, where))


def read_with_protocol(kind: Kind, name_or_path: str, allowed: tuple[str, ...]) -> tuple[Path, dict, str,
                                                                                       tuple[str, ...]]:
    """A study or search file (``kind``) read and found, its mapping, whose fields must be ``allowed``, and its checked
    ``protocol`` and ``protocol_overrides``: ``(path, mapping, protocol, overrides)``."""
    path = find_file(kind, name_or_path)
    raw = read_mapping(path, kind)
    where = str(path)
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise UserError(f"{where}: unknown field '{unknown[0]}'. Allowed fields: {', '.join(allowed)}.")
    protocol = raw.get("protocol")
    if not isinstance(protocol, str) or not protocol.strip():
        raise UserError(f"{where}: field 'protocol' must be a protocol name or path (e.g. shapes-world), got "
                        f"{protocol!r}.")
    overrides = raw.get("protocol_overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise UserError(f"{where}: field 'protocol_overrides' must be a list of 'dotted.key=value' strings (as "
                        f"--set), e.g. ['generation.images_per_prompt=16'], got {overrides!r}.")
    return path, raw, protocol, tuple(overrides)


def parse_variants(raw_variants: list, where: str) -> tuple[Variant, ...]:
    """The ``variants`` list of a study or search file ``where``: each ``{name, method, set}`` checked (a folder
    name, unique and not ``base``; a known method; recipe fields of that method)."""
    from .train.recipe import METHODS, allowed_fields

    variants, seen = [], set()
    for i, v in enumerate(raw_variants):
        def bad(name: str, what: str) -> UserError:
            return UserError(f"{where}: field 'variants.{i}{'.' + name if name else ''}' {what}")

        if not isinstance(v, dict):
            raise bad("", f"must be a mapping {{name, method, set}}, got {v!r}.")
        unknown = sorted(set(v) - set(_VARIANT_FIELDS))
        if unknown:
            raise bad(unknown[0], f"is not a field of a variant; expected: {', '.join(_VARIANT_FIELDS)}.")
        name, method, sets = v.get("name"), v.get("method"), v.get("set", {})
        if not isinstance(name, str) or not _NAME.match(name) or name == BASE:
            raise bad("name", f"must be a folder name (letters, digits, '.', '_', '-') other than '{BASE}', got "
                              f"{name!r}.")
        if name in seen:
            raise bad("name", f"is '{name}', which names two variants; names must be unique.")
        seen.add(name)
        if method not in METHODS:
            raise bad("method", f"is the unknown training method {method!r}; expected one of: {', '.join(METHODS)}.")
        if not isinstance(sets, dict):
            raise bad("set", f"must be a mapping of recipe fields to values (e.g. {{steps: 150}}), got {sets!r}.")
        fields = [f for f in allowed_fields(method) if f != "method"]
        for key in sets:
            if key not in fields:
                raise bad(f"set.{key}", f"is not a recipe field of method '{method}'; expected one of: "
                                        f"{', '.join(fields)}.")
        variants.append(Variant(name, method, tuple(f"{k}={json.dumps(x)}" for k, x in sets.items())))
    return tuple(variants)


def recipe_hashes(file: str, variants: tuple[Variant, ...], protocol: Protocol) -> dict[str, str]:
    """Each variant's (of the study or search ``file``) effective recipe sha256 under ``protocol`` (values checked as
    ``train-baseline`` does); two variants with one recipe would train one adapter twice and count it twice, and are
    refused."""
    from .train.recipe import load_recipe

    hashes: dict[str, str] = {}
    for i, v in enumerate(variants):
        try:
            sha = load_recipe(v.method, protocol, v.overrides)[0].sha256
        except UserError as e:
            raise UserError(f"{file}: field 'variants.{i}.set' of variant '{v.name}': {e}") from None
        twin = next((n for n, h in hashes.items() if h == sha), None)
        if twin is not None:
            raise UserError(f"{file}: field 'variants.{i}': variant '{v.name}' has the effective recipe of "
                            f"variant '{twin}' (sha256 {sha[:12]}): it would be the same adapter, counted twice. "
                            f"Change its 'set' or drop it.")
        hashes[v.name] = sha
    return hashes


# ----------------------------------------------------------------------------- the study


def run_validity(opts: ValidityOptions) -> ValidityResult:
    """Train, run and read every adapter of the study, compute the statistics, and write into ``opts.out``:
    validity.json, validity.md, validity.csv, adapters.csv, scatter.png and summary.md."""
    from .demo import DemoOptions, evaluate_base
    from .provenance import now_iso
    from .rundir import check_writable
    from .world import is_shapes_world

    t0, start = time.perf_counter(), now_iso()
    study = load_study(opts.study)
    demo = DemoOptions(out=Path(opts.out), protocol=opts.protocol or study.protocol,
                       protocol_overrides=study.protocol_overrides + tuple(opts.protocol_overrides),
                       device=opts.device, cache_dir=opts.cache_dir)
    protocol = load_protocol(demo.protocol, demo.protocol_overrides)
    if not is_shapes_world(protocol.resolve(protocol.base_model, "pipeline")):
        raise UserError(f"Protocol '{protocol.name}' (base_model '{protocol.base_model}') is not a shapes world: the "
                        f"validity study compares metrics with the probe's ground truth, which only a shapes world "
                        f"has. Give a protocol whose base_model is builtin:shapes-world or a world folder.")
    subjects = [protocol.subject(s).name for s in opts.subjects] or [s.name for s in protocol.evaluation_subjects]
    check_writable(opts.out)
    train_and_evaluate(demo, study.file, study.variants, protocol, subjects)
    base_dir = evaluate_base(demo, subjects)
    adapters = [read_adapter(BASE, BASE, (), [base_dir], subjects)]
    adapters += [read_adapter(v.name, v.method, v.overrides, [Path(opts.out) / "runs" / v.name / s for s in subjects],
                              subjects) for v in study.variants]
    corrs, decision = analyse(adapters, opts.resamples, opts.seed, opts.confidence)
    result = ValidityResult(opts, study, protocol, subjects, adapters, corrs, decision, time.perf_counter() - t0,
                            start)
    write_outputs(result)
    return result


def train_and_evaluate(demo, file: str, variants: tuple[Variant, ...], protocol: Protocol,
                       subjects: list[str]) -> None:
    """Train every variant (of the study or search ``file``) on every subject into ``demo.out/adapters/VARIANT/SUBJECT``
    and run ``protocol`` on it into ``runs/VARIANT/SUBJECT``, with the machinery of ``kps-bench demo`` (``demo``: its
    DemoOptions): finished adapters and runs are reused, interrupted trainings resume; an adapter folder trained with
    another recipe or base model is refused first."""
    from .demo import evaluate_adapter, train_adapter

    check_trained(file, variants, recipe_hashes(file, variants, protocol), protocol, Path(demo.out), subjects)
    for i, v in enumerate(variants):
        for s in subjects:
            try:
                train_adapter(demo, v.method, s, name=v.name, overrides=v.overrides)
                evaluate_adapter(demo, v.name, s)
            except UserError as e:
                raise UserError(f"{file}: variant '{v.name}' (variants.{i}), subject '{s}': {e}") from None


def check_trained(file: str, variants: tuple[Variant, ...], hashes: dict[str, str], protocol: Protocol, out: Path,
                  subjects: list[str]) -> None:
    """Refuse, before any work, an adapter folder of a variant trained with another recipe than the variant now asks
    for (the study or search ``file`` changed), or on another base model (the world changed)."""
    from .demo import check_reusable

    for i, v in enumerate(variants):
        for s in subjects:
            folder = out / "adapters" / v.name / s
            if (folder / "training.json").is_file():
                check_reusable(folder, hashes[v.name], protocol, f"variant '{v.name}' (variants.{i} of {file})")


def truth_values(gt: dict) -> dict[str, float]:
    """The study's ground truth from one subject of ``kps-bench world truth`` (None -> NaN)."""
    from .metrics import harmonic_mean

    def num(key: str) -> float:
        x = gt.get(key)
        return float(x) if isinstance(x, (int, float)) else math.nan

    identity, preservation = num("true_identity"), 1.0 - num("true_knowledge_shift")
    return {"gt_identity": identity, "gt_preservation": preservation, "gt_kps": harmonic_mean(identity, preservation),
            "gt_diversity_ratio": num("true_diversity_ratio"), "gt_trigger_shape_rate": num("trigger_shape_rate")}


def read_adapter(name: str, method: str, overrides: tuple[str, ...], run_dirs: list[Path],
                 subjects: list[str], require_truth: bool = True) -> Adapter:
    """An adapter's values from its runs (one per subject, or the base run of every subject); a run without ground
    truth is refused, unless not ``require_truth`` (its values then have none)."""
    from .leaderboard import load_run
    from .registry import COLUMNS

    a = Adapter(name, method, overrides, [str(d) for d in run_dirs], {}, {})
    for d in run_dirs:
        run = load_run(d)
        truth = (run.results.get("ground_truth") or {}).get("subjects") or {}
        for s in (s for s in subjects if s in run.results["metrics"]):
            m = run.results["metrics"][s]
            if s not in truth and require_truth:
                raise UserError(f"Run '{d}' has no ground truth for subject '{s}' (results.json 'ground_truth'): "
                                f"re-run it, or add it with `kps-bench world truth {d}`.")
            a.subjects[s] = {**{k: float(m[k]["value"]) for k in COLUMNS if k in m},
                             **(truth_values(truth[s]) if s in truth else {})}
            if "diversity_ratio" in m:
                a.half_widths[s] = (m["diversity_ratio"]["ci_high"] - m["diversity_ratio"]["ci_low"]) / 2
            if run.training.get("recipe_sha256"):
                a.recipe_sha256[s] = run.training["recipe_sha256"]
        a.train_seconds += float(run.training.get("duration_s") or 0.0)
        a.run_seconds += sum((run.provenance.get("timings_s") or {}).values())
    missing = [s for s in subjects if s not in a.subjects]
    if missing:
        raise UserError(f"The runs of '{name}' ({', '.join(a.runs)}) have no results for subject(s) "
                        f"{', '.join(missing)}.")
    keys = set.intersection(*(set(v) for v in a.subjects.values()))
    a.values = {k: math.fsum(v[k] for v in a.subjects.values()) / len(a.subjects) for k in sorted(keys)}
    return a


# ----------------------------------------------------------------------------- statistics


def bootstrap_over_adapters(stat, columns: list[list[float]], resamples: int, seed: int,
                            confidence: float) -> tuple[float, float, float, int]:
    """``stat`` of ``columns`` (each one value per adapter) over the adapters where every column is defined, its
    percentile bootstrap interval (adapters drawn by :func:`kps_bench.metrics.resample_indices` with ``seed``, the
    same draws for every column) and the number of adapters used: ``(value, low, high, n)``; NaN below 2 adapters.
    ``stat`` maps the columns ``[..., n]`` to ``[...]``."""
    import torch

    from . import metrics as M

    t = torch.tensor(columns, dtype=torch.float64)
    t = t[:, ~torch.isnan(t).any(0)]
    n = t.shape[1]
    if n < 2:
        return math.nan, math.nan, math.nan, n
    lo, hi = M.percentile_interval(stat(*t[:, M.resample_indices(n, resamples, seed)]), confidence)
    return float(stat(*t)), lo, hi, n


def correlate(x: list[float], y: list[float], resamples: int, seed: int,
              confidence: float) -> tuple[float, float, float, int]:
    """Spearman's rho of ``x`` and ``y`` (one value per adapter) with its bootstrap interval over adapters:
    ``(rho, low, high, n)`` (see :func:`bootstrap_over_adapters`)."""
    from .metrics import spearman

    return bootstrap_over_adapters(spearman, [x, y], resamples, seed, confidence)


def rho_difference(a: list[float], b: list[float], truth: list[float], resamples: int, seed: int,
                   confidence: float) -> tuple[float, float, float, int]:
    """rho(b, truth) - rho(a, truth) over the adapters where all three are defined, with its paired bootstrap
    interval (both rhos from the same draws): ``(difference, low, high, n)``."""
    from .metrics import spearman

    return bootstrap_over_adapters(lambda a, b, t: spearman(b, t) - spearman(a, t), [a, b, truth], resamples, seed,
                                   confidence)


def primary_score(rho: dict[str, float]) -> str:
    """The decision rule: the candidate of :data:`PRIMARY_CANDIDATES` with the higher rho against gt_kps; the first
    (``kps``, the paper's score) on a tie or when the second's rho is undefined (NaN)."""
    first, second = PRIMARY_CANDIDATES
    a, b = rho.get(first, math.nan), rho.get(second, math.nan)
    return second if b == b and (a != a or b > a) else first


def analyse(adapters: list[Adapter], resamples: int, seed: int,
            confidence: float) -> tuple[list[Correlation], Decision | None]:
    """The correlation of every pair of :data:`PAIRS` that every adapter has, with targets, and the decision rule
    (None when kps or kps_gain was not measured)."""
    def column(key: str) -> list[float]:
        return [a.values[key] for a in adapters]

    corrs = []
    for metric, truth in PAIRS:
        if all(metric in a.values and truth in a.values for a in adapters):
            rho, lo, hi, n = correlate(column(metric), column(truth), resamples, seed, confidence)
            corrs.append(Correlation(metric, truth, rho, lo, hi, n, TARGETS.get(metric)))
    rho = {c.metric: c.rho for c in corrs if c.metric in PRIMARY_CANDIDATES}
    if set(rho) != set(PRIMARY_CANDIDATES):
        return corrs, None
    primary = primary_score(rho)
    corrs = [replace(c, target=PRIMARY_TARGET) if c.metric == primary else c for c in corrs]
    first, second = PRIMARY_CANDIDATES
    d, lo, hi, n = rho_difference(column(first), column(second), column("gt_kps"), resamples, seed, confidence)
    return corrs, Decision(primary, rho, d, lo, hi, n)


# ----------------------------------------------------------------------------- outputs


def _f(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or x != x else f"{x:.{digits}f}"


def _target_text(c: Correlation) -> str:
    if c.target is None:
        return ""
    return f"≥ {c.target:g}: " + ("met" if c.met else f"missed by {_f(c.shortfall)}" if c.rho == c.rho
                                   else "undefined")


def table_markdown(corrs: list[Correlation]) -> str:
    lines = ["| metric | ground truth | Spearman ρ [95% CI] | adapters | target |", "|---|---|---|---|---|"]
    lines += [f"| {c.metric} | {c.truth} | {_f(c.rho)} [{_f(c.ci_low)}, {_f(c.ci_high)}] | {c.n} | {_target_text(c)} |"
              for c in corrs]
    return "\n".join(lines) + "\n"


def table_csv(corrs: list[Correlation]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["metric", "truth", "rho", "ci_low", "ci_high", "n", "target", "met"])
    for c in corrs:
        w.writerow([c.metric, c.truth, c.rho, c.ci_low, c.ci_high, c.n, "" if c.target is None else c.target,
                    "" if c.met is None else c.met])
    return buf.getvalue()


def adapters_csv(adapters: list[Adapter]) -> str:
    """One row per adapter: its name, method, recipe overrides and every value (mean over subjects)."""
    keys = sorted(set.intersection(*(set(a.values) for a in adapters)))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["adapter", "method", "overrides", *keys])
    for a in adapters:
        w.writerow([a.name, a.method, " ".join(a.overrides), *(a.values[k] for k in keys)])
    return buf.getvalue()


def diversity_sample(adapters: list[Adapter]) -> dict:
    """The half-width of each trained adapter's (variant and subject) diversity_ratio CI against
    :data:`DIVERSITY_HALF_WIDTH` (the base model's ratio is 1 by construction, and left out)."""
    widths = {f"{a.name}/{s}": w for a in adapters if a.name != BASE for s, w in a.half_widths.items()}
    finite = [w for w in widths.values() if w == w]
    return {"target": DIVERSITY_HALF_WIDTH, "half_widths": widths, "n": len(widths),
            "max_half_width": max(finite) if finite else math.nan,
            "n_within_target": sum(w <= DIVERSITY_HALF_WIDTH for w in finite)}


def summary_text(r: ValidityResult) -> str:
    """README-ready Markdown: what was done, the table, the decision, the targets, the diversity sample, the time."""
    protocol, subjects, opts = r.protocol, r.subjects, r.options
    trained = [a for a in r.adapters if a.name != BASE]
    overrides = ", ".join(f"`{o}`" for o in r.protocol_overrides)
    parts = [
        f"Does each metric rank adapters as the shapes world's ground truth does? `kps-bench validate --study "
        f"{opts.study}` trained {len(trained)} adapter variants ({', '.join(a.name for a in trained)}) on each of "
        f"{len(subjects)} evaluation subject(s) ({', '.join(subjects)}): {len(trained) * len(subjects)} adapters. It "
        f"ran protocol {protocol.name} v{protocol.version}{f' with {overrides}' if overrides else ''} (sha256 "
        f"{protocol.sha256[:16]}) on each and on the base model, and compared every metric with the probe's ground "
        f"truth over the {len(r.adapters)} adapters (the base model included; an adapter's value is its mean over the "
        f"subjects): Spearman's ρ, with a 95% bootstrap CI over adapters ({opts.resamples} resamples, seed "
        f"{opts.seed}).",
        table_markdown(r.correlations).rstrip(),
    ]
    d = r.decision
    if d is not None:
        first, second = PRIMARY_CANDIDATES
        other = second if d.primary == first else first
        parts.append(f"**Primary column.** The rule, stated in advance: the leaderboard's primary column (its default "
                     f"sort) is whichever of `{first}` and `{second}` has the higher ρ against gt_kps (a tie keeps "
                     f"`{first}`). It is **`{d.primary}`**: ρ {_f(d.rho[d.primary])} against {_f(d.rho[other])} for "
                     f"`{other}`; ρ({second}) − ρ({first}) = {_f(d.difference)} [{_f(d.ci_low)}, {_f(d.ci_high)}] "
                     f"(paired bootstrap over the {d.n} adapters).")
    targets = [c for c in r.correlations if c.target is not None]
    if targets:
        parts.append("**Targets.** " + "; ".join(f"`{c.metric}` against {c.truth}: ρ {_f(c.rho)}, {_target_text(c)}"
                                                 for c in targets) + ".")
    div = diversity_sample(r.adapters)
    if div["n"]:
        parts.append(f"**Diversity sample.** {protocol.generation.images_per_prompt} images per prompt (each "
                     f"trigger-free prompt is a class prompt): the half-width of the diversity_ratio 95% CI is at most "
                     f"{_f(div['max_half_width'])} over the {div['n']} adapters; {div['n_within_target']} of "
                     f"{div['n']} are within the target ≤ {DIVERSITY_HALF_WIDTH:g}.")
    train_s = sum(a.train_seconds for a in r.adapters)
    run_s = sum(a.run_seconds for a in r.adapters)
    parts.append(f"**Wall time.** {train_s / 60:.1f} min training and {run_s / 60:.1f} min generating and scoring, as "
                 f"recorded in the adapters' training.json and the runs' results.json; the invocation that wrote this "
                 f"took {r.seconds / 60:.1f} min (finished adapters and runs are reused).")
    return "\n\n".join(parts) + "\n"


def write_outputs(r: ValidityResult) -> None:
    """validity.json (everything, with provenance), validity.md/.csv (the table), adapters.csv (the points),
    scatter.png and summary.md, each written to a temporary file and renamed."""
    from . import KPS_VERSION, __version__
    from .figures import Panel, scatter_grid
    from .provenance import git_commit, now_iso, package_versions
    from .rundir import write_json_atomic, write_text_atomic

    out, protocol, opts = r.out, r.protocol, r.options
    record = {
        "kps_bench_version": __version__, "kps_version": KPS_VERSION, "git_commit": git_commit(),
        "packages": package_versions(), "start_time": r.start_time, "end_time": now_iso(),
        "seconds": round(r.seconds, 1),
        "study": {"file": r.study.file, "sha256": r.study.sha256, "protocol": r.study.protocol,
                  "protocol_overrides": list(r.study.protocol_overrides),
                  "variants": [asdict(v) for v in r.study.variants]},
        "protocol": {"name": protocol.name, "version": protocol.version, "sha256": protocol.sha256,
                     "overrides": list(r.protocol_overrides),
                     "images_per_prompt": protocol.generation.images_per_prompt},
        "subjects": r.subjects,
        "bootstrap": {"unit": "adapter", "resamples": opts.resamples, "seed": opts.seed,
                      "confidence": opts.confidence},
        "correlations": [{**asdict(c), "met": c.met, "shortfall": c.shortfall} for c in r.correlations],
        "decision": asdict(r.decision) if r.decision else None,
        "diversity_sample": diversity_sample(r.adapters),
        "adapters": [asdict(a) for a in r.adapters],
        "seconds_recorded": {"training": sum(a.train_seconds for a in r.adapters),
                             "runs": sum(a.run_seconds for a in r.adapters)},
    }
    write_json_atomic(out / "validity.json", record)
    write_text_atomic(out / "validity.md", table_markdown(r.correlations))
    write_text_atomic(out / "validity.csv", table_csv(r.correlations))
    write_text_atomic(out / "adapters.csv", adapters_csv(r.adapters))
    write_text_atomic(out / "summary.md", r.summary)
    panels = [Panel(f"{c.metric}: ρ {_f(c.rho, 2)} [{_f(c.ci_low, 2)}, {_f(c.ci_high, 2)}]", c.truth, c.metric,
                    [(a.name, a.values[c.truth], a.values[c.metric]) for a in r.adapters]) for c in r.correlations]
    scatter_grid(panels, out / "scatter.png",
                 f"{protocol.name} v{protocol.version}: metric against ground truth, one point per adapter")
