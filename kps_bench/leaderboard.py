"""Leaderboards: run directories -> one row per method (or subject) with CIs, ranks and paired tests.

Values are means over subjects of the per-subject values in each run's results.json. Confidence
intervals come from a two-level bootstrap (subjects with replacement, then each drawn subject's
prompts with replacement; :func:`kps_bench.metrics.resampled_mean`, as results.json's ``overall``),
recomputed from the runs' stored embeddings. Rows must average over the same subjects (methods, with
``--group-by subject``) unless partial rows are allowed, and are then marked. With a reference method,
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
from .evaluate import SubjectStats, prompt_resamples, subject_stats
from .registry import COLUMNS, GROUND_TRUTH, METRICS, reported
from .rundir import ImageRecord, check_run_files, load_embeddings, read_manifest

TESTED = ("kps", "preservation")


@dataclass
class Run:
    """One run directory: who made it, what was measured, and per-subject prompt statistics."""

    path: Path
    method: str
    results: dict
    stats: dict[str, SubjectStats]
    ground_truth: dict[str, dict] = field(default_factory=dict)
    records: list[ImageRecord] = field(default_factory=list)

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
    names = reported(results["provenance"]["protocol"]["metrics"])
    stats = {s: subject_stats(records, emb, s, names) for s in results["metrics"]}
    gt = {s: {m.name: d[m.truth] for m in GROUND_TRUTH if isinstance(d.get(m.truth), (int, float))}
          for s, d in ((results.get("ground_truth") or {}).get("subjects") or {}).items()}
    return Run(path, method_name(results), results, stats, gt, records)


@dataclass
class Table:
    """A leaderboard: rows (dicts), the columns shown, and the footer that says what was measured."""

    rows: list[dict]
    metrics: list[str]
    footer: dict
    group_by: str
    reference: str | None


def _group_runs(runs: list[Run], group_by: str) -> dict[str, list[tuple[Run, str]]]:
    """Group key -> (run, subject) items, in subject (or method) order."""
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
        items.sort(key=lambda item: item[1] if group_by == "method" else item[0].method)
    return groups


def _members(items: list[tuple[Run, str]], group_by: str) -> frozenset[str]:
    """What a row averages over: its subjects (or, grouped by subject, its methods)."""
    return frozenset(s if group_by == "method" else r.method for r, s in items)


def _check_partial(groups: dict[str, list[tuple[Run, str]]], group_by: str, allow_partial: bool) -> frozenset[str]:
    """Every member (subject or method) of the table; refuses rows over fewer of them unless ``allow_partial``."""
    everyone = frozenset().union(*(_members(items, group_by) for items in groups.values()))
    partial = {key: everyone - _members(items, group_by) for key, items in groups.items()
               if _members(items, group_by) != everyone}
    if partial and not allow_partial:
        what = "subjects" if group_by == "method" else "methods"
        lines = "; ".join(f"'{key}' lacks {', '.join(sorted(missing))}" for key, missing in sorted(partial.items()))
        raise UserError(f"The rows average over different {what}, so their means are not comparable: {lines}. Run the "
                        f"missing {what}, leave those runs out, or pass --allow-partial to list such rows marked "
                        f"'(partial)'.")
    return everyone


def _generated_files(items: list[tuple[Run, str]]) -> tuple[int, int]:
    """Distinct generated image files of the items (each run's own), and how many of them are flagged."""
    files = {(str(r.path), x.path): x.valid for r, s in items for x in r.records
             if x.subject == s and x.role != "reference"}
    return len(files), sum(not valid for valid in files.values())


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
                 resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
                 allow_partial: bool = False) -> list[Table]:
    """One table per protocol (hash, kps_version); mixing them is refused unless ``allow_mixed``, and rows over fewer
    subjects (methods) than others unless ``allow_partial``."""
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
    return [_table(rs, group_by, reference, resamples, seed, confidence, allow_partial) for rs in by_key.values()]


def _table(runs: list[Run], group_by: str, reference: str | None, resamples: int, seed: int, confidence: float,
           allow_partial: bool) -> Table:
    groups = _group_runs(runs, group_by)
    everyone = _check_partial(groups, group_by, allow_partial)
    if reference is not None and group_by != "method":
        raise UserError("--reference compares methods; use it with --group-by method.")
    if reference is not None and reference not in groups:
        raise UserError(f"--reference '{reference}' is not among the methods of these runs: {', '.join(sorted(groups))}.")
    available = [m for m in COLUMNS if all(m in r.results["metrics"][s] for items in groups.values()
                                            for r, s in items)]
    gt_cols = [m.name for m in GROUND_TRUTH if any(m.name in d for r in runs for d in r.ground_truth.values())]
    rows = []
    for gi, (key, items) in enumerate(sorted(groups.items())):
        n_images, n_flagged = _generated_files(items)
        row = {"name": key, "n_subjects": len({s for _, s in items}), "n_images": n_images,
               "flagged": n_flagged / n_images if n_images else float("nan"),
               "partial": _members(items, group_by) != everyone}
        boot = prompt_resamples([r.stats[s] for r, s in items], resamples, seed + gi)
        for m in available:
            value = sum(r.results["metrics"][s][m]["value"] for r, s in items) / len(items)
            samples = M.resampled_mean(torch.stack([b[m] for b in boot]), seed + gi)
            lo, hi = M.percentile_interval(samples, confidence)
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
        "n_images_total": _generated_files([(r, s) for r in runs for s in r.results["metrics"]])[0],
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
    return h + ["subjects", "images", "flagged"]


def _name(row: dict) -> str:
    return f"{row['name']} (partial)" if row["partial"] else row["name"]


def _tail(row: dict) -> list[str]:
    """The subjects, images and flagged-rate cells."""
    return [str(row["n_subjects"]), str(row["n_images"]), f"{row['flagged']:.3f}"]


def _cells(t: Table, row: dict, fmt=_fmt, pfmt=_p) -> list[str]:
    cells = [_rank(row), _name(row)] + [fmt(row[m]) if m in row else "—" for m in t.metrics]
    if t.reference:
        cells += ["ref" if row["name"] == t.reference else pfmt(row.get(f"p_{m}")) for m in TESTED]
    return cells + _tail(row)


def footer_text(t: Table) -> str:
    f = t.footer
    parts = [f"Protocol {f['protocol']} v{f['protocol_version']} (sha256 {f['protocol_sha256'][:16]}), "
             f"kps_version {f['kps_version']}; CLIP {f['clip']}; DINO {f['dino']}; {f['n_images_total']} generated "
             f"image files in {f['n_runs']} runs. Mean over subjects [{f['confidence']:.0%} CI, bootstrap over "
             f"subjects x prompts, {f['bootstrap']}]. images: distinct generated image files; flagged: the share of "
             f"them that came out NaN or black (left out of the metrics with their seed partners)."]
    if any(r["partial"] for r in t.rows):
        parts.append(f"(partial): a mean over fewer {'subjects' if t.group_by == 'method' else 'methods'} than the "
                     f"other rows'.")
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
    h += ["n_subjects", "n_images", "flagged", "partial", "protocol", "protocol_version", "protocol_sha256",
          "kps_version"]
    w.writerow(h)
    for r in t.rows:
        line = [r.get("rank", ""), r["name"]]
        for m in t.metrics:
            e = r.get(m)
            line += [e["value"], e["ci_low"], e["ci_high"]] if e else ["", "", ""]
        if t.reference:
            line += ["" if r["name"] == t.reference else r.get(f"p_{m}") for m in TESTED]
        f = t.footer
        line += [r["n_subjects"], r["n_images"], r["flagged"], r["partial"], f["protocol"], f["protocol_version"],
                 f["protocol_sha256"], f["kps_version"]]
        w.writerow(line)
    return buf.getvalue()


def to_json_rows(t: Table) -> list[dict]:
    """One machine-readable row per (group, metric): the table's footer fields, then the row's."""
    out = []
    for r in t.rows:
        for m in t.metrics:
            if m in r:
                out.append({**t.footer, t.group_by: r["name"], "metric": m, **r[m], "rank": r.get("rank"),
                            "n_subjects": r["n_subjects"], "n_images": r["n_images"], "flagged": r["flagged"],
                            "partial": r["partial"], "p_vs_reference": r.get(f"p_{m}"), "reference": t.reference})
    return out


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(s: str) -> str:
    return "".join(_LATEX.get(c, c) for c in s)


def to_latex(t: Table) -> str:
    """A booktabs-free ``tabular``: value ± half CI width, best value per column in bold."""
    higher_better = {m: METRICS[m].higher_is_better for m in t.metrics}
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
        cells = [_rank(r, "--"), latex_escape(_name(r))]
        cells += [fmt(m)(r[m]) if m in r else "--" for m in t.metrics]
        if t.reference:
            cells += ["ref" if r["name"] == t.reference else latex_escape(_p(r.get(f"p_{m}"))) for m in TESTED]
        cells += _tail(r)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\hline", r"\end{tabular}", "% " + footer_text(t)]
    return "\n".join(lines) + "\n"


def render(tables: list[Table], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([row for t in tables for row in to_json_rows(t)], indent=2) + "\n"
    one = {"md": to_markdown, "csv": to_csv, "tex": to_latex}[fmt]
    return "\n".join(one(t) for t in tables)
