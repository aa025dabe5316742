"""``kps-bench compare``: one method against a reference method, paired over (subject, training seed).

The unit of a paper's claim ("CAT keeps diversity better than LoRA") is a trained adapter: a subject and a training
seed. For each metric, every subject and seed that both methods have gives one pair of per-subject values (from the
runs' results.json, or the shapes world's ground truth stored with them); the table reports both means over the
pairs, the mean difference (method minus reference) with a percentile bootstrap CI over pairs, and a two-sided
Wilcoxon signed-rank p-value, Holm-corrected over the compared metrics. The leaderboard's own tests pair prompts
instead (``kps-bench leaderboard --reference``), which speaks for these subjects' prompts, not for new adapters.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass

import torch

from . import metrics as M
from .errors import UserError
from .leaderboard import Run, wilcoxon
from .registry import COLUMNS, GROUND_TRUTH, METRICS

#: The metrics compared by default: the paper's two claims (diversity kept; KPS raised at similar identity), with the
#: shapes world's truth of each where the runs have it.
DEFAULT_METRICS = ("kps", "kps_gain", "identity", "preservation", "diversity_ratio", "vendi_ratio", "gt_identity",
                   "gt_knowledge_shift", "gt_diversity_ratio")


@dataclass(frozen=True)
class Comparison:
    """``method`` minus ``reference`` on ``metric`` over ``n`` (subject, training seed) pairs."""

    metric: str
    method: str
    reference: str
    n: int
    method_mean: float
    reference_mean: float
    difference: float
    ci_low: float
    ci_high: float
    p: float
    p_holm: float
    higher_is_better: bool


def value(run: Run, subject: str, metric: str) -> float:
    """A run's per-subject value of a metric or ground truth (NaN when it has none)."""
    if metric in COLUMNS:
        x = ((run.results["metrics"].get(subject) or {}).get(metric) or {}).get("value")
    else:
        x = run.ground_truth.get(subject, {}).get(metric)
    return float(x) if isinstance(x, (int, float)) else math.nan


def pairs(runs: list[Run], method: str, reference: str, metric: str) -> list[tuple[str, int | None, float, float]]:
    """``(subject, training seed, method's value, reference's value)`` for every subject and seed both methods have
    (NaN values left out); a subject's single run of unknown seed pairs with the other side's single run."""
    def by_key(name: str) -> dict[tuple[str, int | None], Run]:
        out: dict[tuple[str, int | None], Run] = {}
        for r in runs:
            if r.method == name:
                for s in r.results["metrics"]:
                    out[(s, r.train_seed)] = r
        return out

    mine, ref = by_key(method), by_key(reference)
    rows = []
    for key in sorted(mine.keys() & ref.keys(), key=lambda k: (k[0], -1 if k[1] is None else k[1])):
        a, b = value(mine[key], key[0], metric), value(ref[key], key[0], metric)
        if a == a and b == b:
            rows.append((key[0], key[1], a, b))
    return rows


def compare(runs: list[Run], method: str, reference: str, metrics: tuple[str, ...] | None = None,
            resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> list[Comparison]:
    """The comparison of ``method`` with ``reference`` on each of ``metrics`` (see the module); every one named must
    have pairs. None: those of :data:`DEFAULT_METRICS` that have pairs."""
    methods = sorted({r.method for r in runs})
    for name, what in ((method, "--method"), (reference, "--reference")):
        if name not in methods:
            raise UserError(f"{what} '{name}' is not among the methods of these runs: {', '.join(methods)}.")
    if method == reference:
        raise UserError(f"--method and --reference are both '{method}': compare two different methods.")
    known = COLUMNS + tuple(m.name for m in GROUND_TRUTH)
    named = metrics is not None
    for m in metrics or ():
        if m not in known:
            raise UserError(f"--metric '{m}' is not a metric or ground truth of kps-bench; expected one of: "
                            f"{', '.join(known)}.")
    found = [(m, pairs(runs, method, reference, m)) for m in (metrics if named else DEFAULT_METRICS)]
    missing = [m for m, p in found if not p]
    if named and missing:
        raise UserError(f"--metric {missing[0]}: no subject and training seed has a value of it in runs of both "
                        f"'{method}' and '{reference}' (ground truth exists only on the shapes world).")
    found = [(m, p) for m, p in found if p]
    if not found:
        raise UserError(f"No subject and training seed has runs of both '{method}' and '{reference}' with these "
                        f"metrics: run both methods on the same subjects (and seeds).")
    out = []
    for i, (m, rows) in enumerate(found):
        a = torch.tensor([r[2] for r in rows], dtype=torch.float64)
        b = torch.tensor([r[3] for r in rows], dtype=torch.float64)
        d = a - b
        lo, hi = M.percentile_interval(d[M.resample_indices(len(rows), resamples, seed + i)].mean(-1), confidence)
        out.append(Comparison(m, method, reference, len(rows), float(a.mean()), float(b.mean()), float(d.mean()), lo,
                              hi, wilcoxon(d), math.nan, METRICS[m].higher_is_better))
    holm = M.holm([c.p for c in out])
    return [Comparison(**{**asdict(c), "p_holm": q}) for c, q in zip(out, holm)]


def _f(x: float, sign: bool = False) -> str:
    return "—" if x != x else (f"{x:+.3f}" if sign else f"{x:.3f}")


def _p(x: float) -> str:
    return "—" if x != x else (f"{x:.2g}" if x < 0.01 else f"{x:.3f}")


def render(comparisons: list[Comparison], fmt: str = "md") -> str:
    """The comparisons as Markdown (with a footer that says what was paired and tested), CSV or JSON."""
    if fmt == "json":
        return json.dumps([asdict(c) for c in comparisons], indent=1) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(list(asdict(comparisons[0])))
        for c in comparisons:
            w.writerow(list(asdict(c).values()))
        return buf.getvalue()
    c0 = comparisons[0]
    lines = [f"| metric | {c0.method} | {c0.reference} | Δ ({c0.method} − {c0.reference}) [95% CI] | pairs | p | "
             f"p_holm |", "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        arrow = "" if c.higher_is_better else " (lower is better)"
        lines.append(f"| {c.metric}{arrow} | {_f(c.method_mean)} | {_f(c.reference_mean)} | {_f(c.difference, True)} "
                     f"[{_f(c.ci_low, True)}, {_f(c.ci_high, True)}] | {c.n} | {_p(c.p)} | {_p(c.p_holm)} |")
    lines.append("")
    lines.append(f"Pairs: one per subject and training seed that both methods have (each side's per-subject value); "
                 f"Δ: the mean paired difference with a percentile bootstrap CI over pairs; p: two-sided Wilcoxon "
                 f"signed-rank test over the pairs, p_holm: Holm-corrected over the {len(comparisons)} metrics.")
    return "\n".join(lines) + "\n"
