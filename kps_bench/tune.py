"""``kps-bench tune``: the equal-budget recipe search. Which recipe of each training method does best on the
development subjects, when every method gets the same number of tries and one selection rule, stated in advance?

A search file (``kps_bench/searches/NAME.yaml``, or ``./searches``, ``$KPS_BENCH_SEARCHES``, or a path) names a
protocol (with ``protocol_overrides``), the metric that selects (``select``, a leaderboard column) and the
configurations (``variants``, as in a validity study: a method and recipe overrides ``set`` over the protocol's
recipe). Every method must have the same number of configurations. Each is trained on every development subject of
the protocol (``OUT/adapters/VARIANT/SUBJECT``) and run (``OUT/runs/VARIANT/SUBJECT``) with the machinery of
``kps-bench demo`` and ``validate``: finished adapters and runs are reused, interrupted trainings resume.

The rule: per method, the configuration with the best mean of ``select`` over the development subjects (highest, or
lowest for a lower-is-better metric); a tie keeps the earlier configuration in the file. Evaluation subjects are
refused: a recipe chosen on them would be tuned on the test set.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import SEARCHES
from .errors import UserError
from .protocol import Protocol, load_protocol
from .validity import Adapter, Variant, parse_variants, read_adapter, read_with_protocol, train_and_evaluate

_SEARCH_FIELDS = ("protocol", "protocol_overrides", "select", "variants")
#: Ground-truth values shown beside the selection metric when the runs have them (the shapes world).
TRUTH_SHOWN = ("gt_identity", "gt_preservation", "gt_kps")


@dataclass(frozen=True)
class Search:
    """A validated search file: the protocol with its overrides, the selection metric and the configurations."""

    file: str
    sha256: str
    protocol: str
    protocol_overrides: tuple[str, ...]
    select: str
    variants: tuple[Variant, ...]

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(v.method for v in self.variants))


@dataclass
class TuneOptions:
    """What ``kps-bench tune`` was asked to do beyond the search file."""

    out: Path = Path("kps-bench-tune")
    search: str = "shapes-world"
    protocol_overrides: tuple[str, ...] = ()
    #: Development subjects (default: all of the protocol's).
    subjects: tuple[str, ...] = ()
    device: str = "auto"
    cache_dir: Path | None = None


@dataclass
class TuneResult:
    """A finished search: the configurations read from their runs (an :class:`Adapter` each, values averaged over the
    subjects), the chosen one per method, and the seconds this invocation took."""

    options: TuneOptions
    search: Search
    protocol: Protocol
    subjects: list[str]
    adapters: list[Adapter]
    chosen: dict[str, str]
    seconds: float
    start_time: str

    @property
    def out(self) -> Path:
        return Path(self.options.out)


def load_search(name_or_path: str) -> Search:
    """Read and check a search file; every error names the file, the field and what is expected."""
    from .registry import COLUMNS

    path, raw, protocol, overrides = read_with_protocol(SEARCHES, name_or_path, _SEARCH_FIELDS)
    where = str(path)
    select = raw.get("select")
    if select not in COLUMNS:
        raise UserError(f"{where}: field 'select' must name the metric that chooses each method's recipe, one of: "
                        f"{', '.join(COLUMNS)}; got {select!r}.")
    raw_variants = raw.get("variants")
    if not isinstance(raw_variants, list) or not raw_variants:
        raise UserError(f"{where}: field 'variants' must list the configurations to try (name, method, set), got "
                        f"{raw_variants!r}.")
    variants = parse_variants(raw_variants, where)
    counts = {m: sum(v.method == m for v in variants) for m in dict.fromkeys(v.method for v in variants)}
    if len(set(counts.values())) > 1:
        raise UserError(f"{where}: field 'variants' gives the methods different budgets ("
                        f"{', '.join(f'{m} {n}' for m, n in counts.items())} configurations): an equal-budget search "
                        f"gives every method the same number. Add or drop configurations.")
    return Search(where, hashlib.sha256(path.read_bytes()).hexdigest(), protocol, overrides, select, variants)


def search_subjects(protocol: Protocol, names: tuple[str, ...]) -> list[str]:
    """The development subjects to search on: ``names`` (each must be one), or all of the protocol's."""
    dev = [s.name for s in protocol.subjects if s.split == "development"]
    if not names:
        if not dev:
            raise UserError(f"Protocol '{protocol.name}' has no development subjects (subjects with 'split: "
                            f"development'): a recipe search runs on them only. Mark some in the protocol's "
                            f"'subjects'.")
        return dev
    for n in names:
        s = protocol.subject(n)
        if s.split != "development":
            raise UserError(f"Subject '{s.name}' of protocol '{protocol.name}' is an evaluation subject: a recipe "
                            f"chosen on it would be tuned on the test set. Search on development subjects: "
                            f"{', '.join(dev) or 'none'}.")
    return [protocol.subject(n).name for n in names]


def choose(adapters: list[Adapter], metric: str) -> dict[str, str]:
    """Per method, the name of the configuration with the best mean of ``metric`` (by the registry's direction; NaN
    never wins; a tie keeps the earlier one)."""
    from .registry import METRICS

    sign = 1.0 if METRICS[metric].higher_is_better else -1.0
    best: dict[str, tuple[float, str]] = {}
    for a in adapters:
        x = a.values.get(metric, math.nan)
        if x != x:
            continue
        if a.method not in best or sign * x > best[a.method][0]:
            best[a.method] = (sign * x, a.name)
    return {m: name for m, (_, name) in best.items()}


def run_tune(opts: TuneOptions) -> TuneResult:
    """Train and run every configuration of the search on the development subjects, choose each method's, and write
    into ``opts.out``: tune.json, tune.md and tune.csv."""
    from .demo import DemoOptions
    from .provenance import now_iso
    from .rundir import check_writable

    t0, start = time.perf_counter(), now_iso()
    search = load_search(opts.search)
    demo = DemoOptions(out=Path(opts.out), protocol=search.protocol,
                       protocol_overrides=search.protocol_overrides + tuple(opts.protocol_overrides),
                       device=opts.device, cache_dir=opts.cache_dir)
    protocol = load_protocol(demo.protocol, demo.protocol_overrides)
    subjects = search_subjects(protocol, opts.subjects)
    check_writable(opts.out)
    train_and_evaluate(demo, search.file, search.variants, protocol, subjects)
    adapters = [read_adapter(v.name, v.method, v.overrides, [Path(opts.out) / "runs" / v.name / s for s in subjects],
                             subjects, require_truth=False) for v in search.variants]
    result = TuneResult(opts, search, protocol, subjects, adapters, choose(adapters, search.select),
                        time.perf_counter() - t0, start)
    write_outputs(result)
    return result


# ----------------------------------------------------------------------------- outputs


def _f(x: float | None) -> str:
    return "—" if x is None or x != x else f"{x:.3f}"


def _columns(r: TuneResult) -> list[str]:
    return [r.search.select] + [t for t in TRUTH_SHOWN if all(t in a.values for a in r.adapters)]


def table_markdown(r: TuneResult) -> str:
    """One row per configuration: method, name, overrides, the selection metric per subject and its mean, the ground
    truth shown (mean over subjects), training seconds per subject, and the choice."""
    sel, cols = r.search.select, _columns(r)
    lines = ["| method | configuration | set | " + " | ".join(f"{sel} {s}" for s in r.subjects)
             + f" | **{sel}** mean | " + " | ".join(cols[1:]) + (" | " if cols[1:] else "")
             + "training s / subject | chosen |"]
    lines.append("|" + "---|" * (5 + len(r.subjects) + len(cols)))
    for a in r.adapters:
        chosen = r.chosen.get(a.method) == a.name
        mean = f"**{_f(a.values.get(sel))}**" if chosen else _f(a.values.get(sel))
        lines.append(f"| {a.method} | {a.name} | {' '.join(f'`{o}`' for o in a.overrides) or '(protocol recipe)'} | "
                     + " | ".join(_f(a.subjects[s].get(sel)) for s in r.subjects) + f" | {mean} | "
                     + "".join(f"{_f(a.values[c])} | " for c in cols[1:])
                     + f"{a.train_seconds / len(r.subjects):.0f} | {'✓' if chosen else ''} |")
    return "\n".join(lines) + "\n"


def table_csv(r: TuneResult) -> str:
    sel, cols = r.search.select, _columns(r)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "configuration", "overrides", *(f"{sel}:{s}" for s in r.subjects), *cols,
                "train_seconds", "run_seconds", "chosen"])
    for a in r.adapters:
        w.writerow([a.method, a.name, " ".join(a.overrides), *(a.subjects[s].get(sel) for s in r.subjects),
                    *(a.values.get(c) for c in cols), round(a.train_seconds, 1), round(a.run_seconds, 1),
                    r.chosen.get(a.method) == a.name])
    return buf.getvalue()


def summary_text(r: TuneResult) -> str:
    """README-ready Markdown: the rule, the table, the choices and the time."""
    from .registry import METRICS

    s, p = r.search, r.protocol
    n = len(s.variants) // len(s.methods)
    way = "highest" if METRICS[s.select].higher_is_better else "lowest"
    picks = "; ".join(f"{m}: `{name}` ({' '.join(a.overrides) or 'the protocol recipe'})"
                      for m, name in r.chosen.items() for a in r.adapters if a.name == name)
    train_s = sum(a.train_seconds for a in r.adapters)
    run_s = sum(a.run_seconds for a in r.adapters)
    return "\n\n".join([
        f"`kps-bench tune --search {r.options.search}` tried {n} configurations of each of {len(s.methods)} methods "
        f"({', '.join(s.methods)}) on the {len(r.subjects)} development subject(s) {', '.join(r.subjects)} of "
        f"protocol {p.name} v{p.version} (sha256 {p.sha256[:16]}). The rule, stated in the search file before it ran: per method, the configuration with the {way} mean "
        f"`{s.select}` over those subjects (a tie keeps the earlier one).",
        table_markdown(r).rstrip(),
        f"**Chosen.** {picks}.",
        f"**Wall time.** {train_s / 60:.1f} min training and {run_s / 60:.1f} min generating and scoring, as recorded "
        f"in the adapters' training.json and the runs' results.json; this invocation took {r.seconds / 60:.1f} min "
        f"(finished adapters and runs are reused)."]) + "\n"


def write_outputs(r: TuneResult) -> None:
    """tune.json (everything, with provenance), tune.md (the summary and table) and tune.csv, each written to a
    temporary file and renamed."""
    from . import __version__
    from .provenance import git_commit, now_iso, package_versions
    from .rundir import write_json_atomic, write_text_atomic

    s = r.search
    write_json_atomic(r.out / "tune.json", {
        "kps_bench_version": __version__, "git_commit": git_commit(), "packages": package_versions(),
        "start_time": r.start_time, "end_time": now_iso(), "seconds": round(r.seconds, 1),
        "search": {"file": s.file, "sha256": s.sha256, "protocol": s.protocol,
                   "protocol_overrides": list(s.protocol_overrides), "select": s.select,
                   "variants": [asdict(v) for v in s.variants]},
        "protocol": {"name": r.protocol.name, "version": r.protocol.version, "sha256": r.protocol.sha256,
                     "overrides": list(s.protocol_overrides + tuple(r.options.protocol_overrides))},
        "subjects": r.subjects, "chosen": r.chosen, "adapters": [asdict(a) for a in r.adapters]})
    write_text_atomic(r.out / "tune.md", summary_text(r))
    write_text_atomic(r.out / "tune.csv", table_csv(r))
