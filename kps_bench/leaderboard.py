"""Leaderboards: run directories -> one row per method (or subject) with CIs, ranks and paired tests.

Values are means over subjects of the per-subject values in each run's results.json. Confidence
intervals come from a two-level bootstrap (subjects with replacement, then each drawn subject's
prompts with replacement), recomputed from the runs' stored embeddings. With a reference method,
every other method is compared to it on per-(subject, prompt) KPS and preservation with a
Wilcoxon signed-rank test.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import metrics as M
from .errors import UserError
from .evaluate import SubjectStats, subject_stats
from .rundir import check_run_files, load_embeddings, read_manifest

METRIC_COLUMNS = ("kps", "identity", "preservation", "clip_i", "clip_t", "dino", "diversity_ratio", "vendi_ratio")
TESTED = ("kps", "preservation")
#: Per-subject ground-truth fields of `kps-bench world truth` -> leaderboard columns (shown when present).
GROUND_TRUTH = {"true_identity": "gt_identity", "true_leakage": "gt_leakage", "true_knowledge_shift": "gt_knowledge_shift",
                "true_diversity_ratio": "gt_diversity_ratio"}
LOWER_IS_BETTER = ("gt_leakage", "gt_knowledge_shift")


@dataclass
class Run:
    """One run directory: who made it, what was measured, and per-subject prompt statistics."""

    path: Path
    method: str
    results: dict
    stats: dict[str, SubjectStats]
    ground_truth: dict[str, dict] = field(default_factory=dict)

    @property
    def provenance(self) -> dict:
        return self.results["provenance"]

    @property
    def protocol_key(self) -> tuple[str, str]:
        return self.provenance["protocol_sha256"], str(self.results["kps_version"])


def method_name(results: dict) -> str:
    """The trainer's method from training.json, else the --label given at run time, else the adapter kind."""
    prov = results["provenance"]
    training = (prov.get("adapter") or {}).get("training") or {}
    if training.get("method"):
        return training["method"]
    if prov.get("label"):
        return prov["label"]
    kind = (prov.get("adapter") or {}).get("kind", "none")
    return "base" if kind == "none" else kind


def load_run(path: str | Path) -> Run:
    path = Path(path)
    f = path / "results.json"
    if not f.is_file():
        raise UserError(f"'{path}' is not a run directory: it has no results.json (make one with `kps-bench run`).")
    try:
        results = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"'{f}' is not valid JSON ({e.msg}); re-run `kps-bench run` or `kps-bench score`.") from None
    if not isinstance(results, dict) or "provenance" not in results or "kps_version" not in results:
        raise UserError(f"'{f}' has no provenance/kps_version: it was not written by kps-bench run or score.")
    if results.get("status") == "failed":
        raise UserError(f"Run '{path}' is marked as failed ({results.get('failure', 'see its results.json')}); fix "
                        f"and re-run it, or leave it out of the leaderboard.")
    check_run_files(path, results)
    records = read_manifest(path / "images.jsonl")
    emb = load_embeddings(path / "embeddings.safetensors")
    stats = {s: subject_stats(records, emb, s) for s in results["metrics"]}
    gt = {s: {col: d[key] for key, col in GROUND_TRUTH.items() if isinstance(d.get(key), (int, float))}
          for s, d in ((results.get("ground_truth") or {}).get("subjects") or {}).items()}
    return Run(path, method_name(results), results, stats, gt)


@dataclass
class Table:
    """A leaderboard: rows (dicts), the columns shown, and the footer that says what was measured."""

    rows: list[dict]
    metrics: list[str]
    footer: dict
    group_by: str
    reference: str | None


def _group_runs(runs: list[Run], group_by: str) -> dict[str, list[tuple[Run, str]]]:
    """Group key -> (run, subject) items."""
    groups: dict[str, list[tuple[Run, str]]] = {}
    for run in runs:
        for s in run.results["metrics"]:
            key = run.method if group_by == "method" else s
            groups.setdefault(key, []).append((run, s))
    for key, items in groups.items():
        seen = [s if group_by == "method" else r.method for r, s in items]
        dup = {x for x in seen if seen.count(x) > 1}
        if dup:
            what = "subject" if group_by == "method" else "method"
            raise UserError(f"Two runs give {group_by} '{key}' the same {what} '{sorted(dup)[0]}'; pass each run once "
                            f"(or label them apart with `kps-bench run --label` or `kps-bench score --label`).")
    return groups


def _bootstrap(items: list[tuple[Run, str]], metric: str, resamples: int, seed: int, confidence: float):
    """Two-level bootstrap of the mean over items (subjects) of a metric recomputed from resampled prompts."""
    g = torch.Generator().manual_seed(seed)
    n = len(items)
    per_item = []
    for i, (run, s) in enumerate(items):
        st = run.stats[s]
        w = M.bootstrap_weights(len(st.prompts), resamples, seed * 7919 + i + 1)
        per_item.append(st.values(w)[metric])
    per_item = torch.stack(per_item)  # [items, resamples]
    pick = torch.randint(0, n, (resamples, n), generator=g)
    samples = per_item.T.gather(1, pick).mean(1)
    return M.percentile_interval(samples, confidence)


def _gt_interval(values: list[float], resamples: int, seed: int, confidence: float):
    t = torch.tensor(values, dtype=torch.float64)
    w = M.bootstrap_weights(len(values), resamples, seed)
    return M.percentile_interval((w * t).sum(1) / w.sum(1), confidence)


def per_prompt(run: Run, subject: str, metric: str) -> dict[str, float]:
    """A metric per trigger-free prompt of one subject (one-hot prompt weights), keyed by the prompt text."""
    st = run.stats[subject]
    vals = st.values(torch.eye(len(st.prompts), dtype=torch.float64))[metric]
    return {p: float(v) for p, v in zip(st.prompts, vals) if not math.isnan(float(v))}


def wilcoxon_against(items: list[tuple[Run, str]], ref_items: list[tuple[Run, str]], metric: str) -> tuple[float, int]:
    """Two-sided Wilcoxon signed-rank p-value over the (subject, prompt) pairs both sides have, and the pair count."""
    from scipy.stats import wilcoxon

    ref = {s: per_prompt(r, s, metric) for r, s in ref_items}
    a, b = [], []
    for run, s in items:
        if s not in ref:
            continue
        mine = per_prompt(run, s, metric)
        for p, v in mine.items():
            if p in ref[s]:
                a.append(v)
                b.append(ref[s][p])
    if not a:
        return float("nan"), 0
    diff = [x - y for x, y in zip(a, b)]
    if all(d == 0 for d in diff):
        return 1.0, len(a)
    return float(wilcoxon(a, b, zero_method="wilcox", alternative="two-sided").pvalue), len(a)


def build_tables(runs: list[Run], group_by: str = "method", reference: str | None = None, allow_mixed: bool = False,
                 resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> list[Table]:
    """One table per protocol (hash, kps_version); mixing them is refused unless ``allow_mixed``."""
    if not runs:
        raise UserError("No run directories given.")
    by_key: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        by_key.setdefault(r.protocol_key, []).append(r)
    if len(by_key) > 1 and not allow_mixed:
        lines = "; ".join(f"{runs_[0].provenance['protocol_name']} v{runs_[0].provenance['protocol_version']} "
                          f"sha256 {k[0][:12]} kps_version {k[1]} ({', '.join(str(r.path) for r in runs_)})"
                          for k, runs_ in by_key.items())
        raise UserError(f"These runs used different protocols or KPS definitions, so their numbers are not comparable: "
                        f"{lines}. Re-run them under one protocol, or pass --allow-mixed for one table per protocol.")
    return [_table(rs, group_by, reference, resamples, seed, confidence) for rs in by_key.values()]


def _table(runs: list[Run], group_by: str, reference: str | None, resamples: int, seed: int, confidence: float) -> Table:
    groups = _group_runs(runs, group_by)
    if reference is not None and group_by != "method":
        raise UserError("--reference compares methods; use it with --group-by method.")
    if reference is not None and reference not in groups:
        raise UserError(f"--reference '{reference}' is not among the methods of these runs: {', '.join(sorted(groups))}.")
    available = [m for m in METRIC_COLUMNS if all(m in r.results["metrics"][s] for items in groups.values()
                                                   for r, s in items)]
    gt_cols = [c for c in GROUND_TRUTH.values() if any(c in d for r in runs for d in r.ground_truth.values())]
    rows = []
    for gi, (key, items) in enumerate(sorted(groups.items())):
        distinct_runs = {id(r): r for r, _ in items}.values()
        row = {"name": key, "n_subjects": len({s for _, s in items}),
               "n_images": sum(r.results["counts"]["base"] + r.results["counts"]["adapter"] for r in distinct_runs)}
        for m in available:
            value = sum(r.results["metrics"][s][m]["value"] for r, s in items) / len(items)
            lo, hi = _bootstrap(items, m, resamples, seed + gi, confidence)
            row[m] = {"value": value, "ci_low": lo, "ci_high": hi}
        for c in gt_cols:
            vals = [r.ground_truth.get(s, {}).get(c) for r, s in items]
            vals = [v for v in vals if v is not None]
            if vals:
                lo, hi = _gt_interval(vals, resamples, seed + gi, confidence)
                row[c] = {"value": sum(vals) / len(vals), "ci_low": lo, "ci_high": hi}
        if reference is not None and key != reference:
            for m in TESTED:
                p, n = wilcoxon_against(items, groups[reference], m)
                row[f"p_{m}"] = p
                row[f"n_pairs_{m}"] = n
        rows.append(row)
    if "kps" in available:  # a row whose kps is undefined (NaN) is not ranked and comes last
        order = sorted(rows, key=lambda r: (math.isnan(r["kps"]["value"]), -r["kps"]["value"]))
        for rank, r in enumerate(order, 1):
            r["rank"] = None if math.isnan(r["kps"]["value"]) else rank
        rows = order
    prov = runs[0].provenance
    enc = prov["protocol"]["encoders"]
    footer = {
        "protocol": prov["protocol_name"], "protocol_version": prov["protocol_version"],
        "protocol_sha256": prov["protocol_sha256"], "kps_version": str(runs[0].results["kps_version"]),
        "clip": f"{enc['clip']['arch']} / {enc['clip']['weights']}",
        "dino": enc["dino"]["model"],
        "n_images": sum(r.results["counts"]["base"] + r.results["counts"]["adapter"] for r in runs),
        "n_runs": len(runs), "bootstrap": f"{resamples} resamples, seed {seed}", "confidence": confidence,
        "test": f"Wilcoxon signed-rank vs {reference} over (subject, prompt) pairs" if reference else None,
    }
    return Table(rows, available + [c for c in gt_cols if any(c in r for r in rows)], footer, group_by, reference)


# ----------------------------------------------------------------------------- formats


def _fmt(entry: dict) -> str:
    return f"{entry['value']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"


def _p(p: float) -> str:
    return "—" if p is None or math.isnan(p) else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


def _rank(row: dict, unranked: str = "—") -> str:
    """The row's rank; ``unranked`` for a row whose kps is undefined (NaN)."""
    if "rank" not in row:
        return ""
    return unranked if row["rank"] is None else str(row["rank"])


def _headers(t: Table) -> list[str]:
    h = ["rank", t.group_by] + t.metrics
    if t.reference:
        h += [f"p({m})" for m in TESTED]
    return h + ["subjects", "images"]


def _cells(t: Table, row: dict, fmt=_fmt, pfmt=_p) -> list[str]:
    cells = [_rank(row), row["name"]] + [fmt(row[m]) if m in row else "—" for m in t.metrics]
    if t.reference:
        cells += ["ref" if row["name"] == t.reference else pfmt(row.get(f"p_{m}")) for m in TESTED]
    return cells + [str(row["n_subjects"]), str(row["n_images"])]


def footer_text(t: Table) -> str:
    f = t.footer
    parts = [f"Protocol {f['protocol']} v{f['protocol_version']} (sha256 {f['protocol_sha256'][:16]}), "
             f"kps_version {f['kps_version']}; CLIP {f['clip']}; DINO {f['dino']}; {f['n_images']} generated images "
             f"in {f['n_runs']} runs. Mean over subjects [{f['confidence']:.0%} CI, bootstrap over subjects x prompts, "
             f"{f['bootstrap']}]."]
    if f.get("test"):
        parts.append(f"p: {f['test']}.")
    return " ".join(parts)


def to_markdown(t: Table) -> str:
    h = _headers(t)
    lines = ["| " + " | ".join(h) + " |", "|" + "|".join("---" for _ in h) + "|"]
    lines += ["| " + " | ".join(_cells(t, r)) + " |" for r in t.rows]
    return "\n".join(lines) + "\n\n" + footer_text(t) + "\n"


def to_csv(t: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    h = ["rank", t.group_by]
    for m in t.metrics:
        h += [m, f"{m}_ci_low", f"{m}_ci_high"]
    if t.reference:
        h += [f"p_{m}" for m in TESTED]
    h += ["n_subjects", "n_images", "protocol", "protocol_version", "protocol_sha256", "kps_version"]
    w.writerow(h)
    for r in t.rows:
        line = [r.get("rank", ""), r["name"]]
        for m in t.metrics:
            e = r.get(m)
            line += [e["value"], e["ci_low"], e["ci_high"]] if e else ["", "", ""]
        if t.reference:
            line += ["" if r["name"] == t.reference else r.get(f"p_{m}") for m in TESTED]
        f = t.footer
        line += [r["n_subjects"], r["n_images"], f["protocol"], f["protocol_version"], f["protocol_sha256"], f["kps_version"]]
        w.writerow(line)
    return buf.getvalue()


def to_json_rows(t: Table) -> list[dict]:
    """One machine-readable row per (group, metric)."""
    out = []
    for r in t.rows:
        for m in t.metrics:
            if m in r:
                out.append({t.group_by: r["name"], "metric": m, **r[m], "rank": r.get("rank"),
                            "n_subjects": r["n_subjects"], "n_images": r["n_images"],
                            "p_vs_reference": r.get(f"p_{m}"), "reference": t.reference, **t.footer})
    return out


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(s: str) -> str:
    return "".join(_LATEX.get(c, c) for c in s)


def to_latex(t: Table) -> str:
    """A booktabs-free ``tabular``: value ± half CI width, best value per column in bold."""
    higher_better = {m: m not in LOWER_IS_BETTER for m in t.metrics}
    best = {}
    for m in t.metrics:
        vals = [r[m]["value"] for r in t.rows if m in r and not math.isnan(r[m]["value"])]
        if vals:
            best[m] = max(vals) if higher_better[m] else min(vals)
    h = _headers(t)
    lines = [r"\begin{tabular}{" + "l" * 2 + "c" * (len(h) - 2) + "}", r"\hline",
             " & ".join(latex_escape(x) for x in h) + r" \\", r"\hline"]

    def fmt(m):
        def f(e):
            s = f"{e['value']:.3f} $\\pm$ {(e['ci_high'] - e['ci_low']) / 2:.3f}"
            return f"\\textbf{{{s}}}" if best.get(m) == e["value"] else s
        return f

    for r in t.rows:
        cells = [_rank(r, "--"), latex_escape(r["name"])]
        cells += [fmt(m)(r[m]) if m in r else "--" for m in t.metrics]
        if t.reference:
            cells += ["ref" if r["name"] == t.reference else latex_escape(_p(r.get(f"p_{m}"))) for m in TESTED]
        cells += [str(r["n_subjects"]), str(r["n_images"])]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\hline", r"\end{tabular}", "% " + footer_text(t)]
    return "\n".join(lines) + "\n"


def render(tables: list[Table], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([row for t in tables for row in to_json_rows(t)], indent=2) + "\n"
    one = {"md": to_markdown, "csv": to_csv, "tex": to_latex}[fmt]
    return "\n".join(one(t) for t in tables)
