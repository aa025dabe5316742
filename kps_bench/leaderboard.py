"""Leaderboards: run directories -> one row per method with CIs, seed spread, ranks and paired tests, or a subject
x method table.

A run is one adapter (one method and training seed) evaluated on its subjects; several runs of one (method,
subject) are training-seed replicates, and must differ in seed. A row's value is the mean over subjects of each
subject's mean over its training seeds of the per-subject values in the runs' results.json. Its confidence interval
comes from a nested bootstrap recomputed from the runs' stored embeddings: subjects with replacement, then each drawn
subject's training seeds, then each drawn seed's prompts (with one seed per subject it is results.json's
``overall`` interval). ``seed_sd`` is the spread across training seeds within a subject, pooled over subjects. Rows
must average over the same subjects unless partial rows are allowed, and are then marked. With a reference method,
every other method is compared to it on per-(subject, prompt) KPS and preservation: the median paired difference
with its nested-bootstrap CI, and Wilcoxon signed-rank p-values Holm-corrected over the table's tests.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import metrics as M
from .errors import UserError
from .evaluate import SubjectStats, mean_over_seeds, prompt_resamples, subject_stats
from .registry import COLUMNS, GROUND_TRUTH, METRICS, reported
from .rundir import ImageRecord, check_run_files, load_embeddings, read_manifest

if TYPE_CHECKING:
    import pandas

#: The metrics compared with the reference method.
TESTED = ("kps", "preservation")
#: The metric that ranks the rows, whose seed spread the tables show, and that the subject x method table shows.
RANKED = "kps"
#: The last row of the subject x method table.
MEAN_ROW = "mean over subjects"


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

    @property
    def training(self) -> dict:
        """The adapter's training.json as the run recorded it (empty without one, e.g. the base model)."""
        return (self.results.get("provenance", {}).get("adapter") or {}).get("training") or {}

    @property
    def train_seed(self) -> int | None:
        """The adapter's training seed (training.json's ``seed``, else its recipe's); None when unknown."""
        seed = self.training.get("seed", (self.training.get("recipe") or {}).get("seed"))
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


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


def load_run(path: str | Path, with_stats: bool = True) -> Run:
    """A run directory, checked; ``with_stats``: also its images and embeddings, read into per-prompt statistics (what
    bootstrap intervals and paired prompt tests need; per-subject values alone need only results.json)."""
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
    records, stats = [], {}
    if with_stats:
        records = read_manifest(path / "images.jsonl")
        emb = load_embeddings(path / "embeddings.safetensors")
        names = reported(results["provenance"]["protocol"]["metrics"])
        stats = {s: subject_stats(records, emb, s, names) for s in results["metrics"]}
    gt = {s: {m.name: d[m.truth] for m in GROUND_TRUTH if isinstance(d.get(m.truth), (int, float))}
          for s, d in ((results.get("ground_truth") or {}).get("subjects") or {}).items()}
    return Run(path, method_name(results), results, stats, gt, records)


@dataclass
class Table:
    """A leaderboard: one row (a dict) per method, the metric columns shown, the metrics tested against the
    reference, and the footer that says what was measured."""

    rows: list[dict]
    metrics: list[str]
    footer: dict
    reference: str | None
    tested: list[str] = field(default_factory=list)


@dataclass
class Pivot:
    """A subject x method table of one metric: ``frame`` (pandas) has one row per subject, then :data:`MEAN_ROW`,
    and columns ``(method, value | ci_low | ci_high | n_seeds)``, methods in rank order."""

    frame: pandas.DataFrame
    metric: str
    footer: dict


#: method -> subject -> the runs (training seeds) of that method on that subject, in seed order
Groups = dict[str, dict[str, list[Run]]]


def _seed_text(run: Run) -> str:
    return "unknown" if run.train_seed is None else str(run.train_seed)


def _group_runs(runs: list[Run]) -> Groups:
    """Runs by method and subject (subjects sorted, runs in training-seed order). Refuses two runs of one (method,
    subject) whose training seeds are equal or unknown: they are not seed replicates."""
    groups: Groups = {}
    for run in runs:
        for s in run.results["metrics"]:
            groups.setdefault(run.method, {}).setdefault(s, []).append(run)
    for method, by_subject in groups.items():
        for s, rs in by_subject.items():
            rs.sort(key=lambda r: (r.train_seed is None, r.train_seed or 0))
            for a, b in zip(rs, rs[1:]):
                if b.train_seed is None or a.train_seed == b.train_seed:
                    raise UserError(
                        f"Runs '{a.path}' and '{b.path}' both evaluate method '{method}' on subject '{s}', with "
                        f"training seeds {_seed_text(a)} and {_seed_text(b)}, so they are not seed replicates (the "
                        f"seed is read from the adapter's training.json, which a run records). Pass each run once; "
                        f"replicates need adapters trained with different seeds (`kps-bench train-baseline --set "
                        f"seed=N`), and different methods different names (`kps-bench run --label`).")
        groups[method] = dict(sorted(by_subject.items()))
    return groups


def _items(by_subject: dict[str, list[Run]]) -> list[tuple[Run, str]]:
    """The (run, subject) items of one method, by subject then seed."""
    return [(r, s) for s, rs in by_subject.items() for r in rs]


def _check_partial(groups: Groups, allow_partial: bool) -> frozenset[str]:
    """Every subject of the table; refuses methods over fewer of them unless ``allow_partial``."""
    everyone = frozenset().union(*groups.values())
    partial = {m: everyone - set(by_subject) for m, by_subject in groups.items() if set(by_subject) != everyone}
    if partial and not allow_partial:
        lines = "; ".join(f"'{m}' lacks {', '.join(sorted(missing))}" for m, missing in sorted(partial.items()))
        raise UserError(f"The rows average over different subjects, so their means are not comparable: {lines}. Run "
                        f"the missing subjects, leave those runs out, or pass --allow-partial to list such rows marked "
                        f"'(partial)'.")
    return everyone


def _generated_files(items: list[tuple[Run, str]]) -> tuple[int, int]:
    """Distinct generated image files of the items (each run's own), and how many of them are flagged."""
    files = {(str(r.path), x.path): x.valid for r, s in items for x in r.records
             if x.subject == s and x.role != "reference"}
    return len(files), sum(not valid for valid in files.values())


def _estimate(point: dict[str, list[float]], per_seed: list[torch.Tensor], seed: int, confidence: float) -> dict:
    """A row's entry from each subject's per-seed values and their bootstrap samples ``[seeds, resamples]`` (in the
    same subject order): the mean over subjects of the seed means, its nested-bootstrap interval, the pooled seed
    SD, and per subject its seed mean with the interval of its seeds and prompts (``by_subject``)."""
    subjects = mean_over_seeds(per_seed, seed)
    lo, hi = M.percentile_interval(M.resampled_mean(subjects, seed), confidence)
    by_subject = {}
    for (s, v), samples in zip(point.items(), subjects):
        s_lo, s_hi = M.percentile_interval(samples, confidence)
        by_subject[s] = {"value": sum(v) / len(v), "ci_low": s_lo, "ci_high": s_hi}
    means = [e["value"] for e in by_subject.values()]
    return {"value": sum(means) / len(means), "ci_low": lo, "ci_high": hi,
            "seed_sd": M.pooled_sd(list(point.values())), "by_subject": by_subject}


def per_prompt(run: Run, subject: str, metric: str) -> dict[str, float]:
    """A metric per trigger-free prompt of one subject (one-hot prompt weights), keyed by the prompt text."""
    st = run.stats[subject]
    vals = st.values(torch.eye(len(st.prompts), dtype=torch.float64))[metric]
    return {p: float(v) for p, v in zip(st.prompts, vals) if not math.isnan(float(v))}


def paired_prompts(items: list[tuple[Run, str]], ref_items: list[tuple[Run, str]], metric: str):
    """Per subject both sides have: the method's and the reference's per-prompt values ``[training seeds,
    prompts]`` (NaN where a seed has none), with the same prompt (text) in each column: the input of
    :func:`kps_bench.metrics.paired_differences`."""
    mine: dict[str, list[dict[str, float]]] = {}
    ref: dict[str, list[dict[str, float]]] = {}
    for side, its in ((mine, items), (ref, ref_items)):
        for run, s in its:
            side.setdefault(s, []).append(per_prompt(run, s, metric))
    a, b = [], []
    for s in sorted(mine.keys() & ref.keys()):
        prompts = sorted({p for d in mine[s] + ref[s] for p in d})
        a.append(torch.tensor([[d.get(p, math.nan) for p in prompts] for d in mine[s]], dtype=torch.float64))
        b.append(torch.tensor([[d.get(p, math.nan) for p in prompts] for d in ref[s]], dtype=torch.float64))
    return a, b


def wilcoxon(diff: torch.Tensor) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (zeros dropped); 1 when all are 0, NaN with
    none."""
    from scipy.stats import wilcoxon as test

    if diff.numel() == 0:
        return float("nan")
    if bool((diff == 0).all()):
        return 1.0
    return float(test(diff.numpy(), zero_method="wilcox", alternative="two-sided").pvalue)


def build_tables(runs: list[Run], group_by: str = "method", reference: str | None = None, allow_mixed: bool = False,
                 resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
                 allow_partial: bool = False) -> list[Table | Pivot]:
    """One table per protocol (hash, kps_version): a leaderboard of methods, or with ``group_by="subject"`` the
    subject x method table of :data:`RANKED`. Mixing protocols is refused unless ``allow_mixed``, and methods over
    fewer subjects than others unless ``allow_partial``."""
    if not runs:
        raise UserError("No run directories given.")
    if reference is not None and group_by != "method":
        raise UserError("--reference compares methods; use it with --group-by method.")
    by_key: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        by_key.setdefault(r.protocol_key, []).append(r)
    if len(by_key) > 1 and not allow_mixed:
        lines = "; ".join(f"{runs_[0].provenance['protocol_name']} v{runs_[0].provenance['protocol_version']} "
                          f"sha256 {k[0][:12]} kps_version {k[1]} ({', '.join(str(r.path) for r in runs_)})"
                          for k, runs_ in by_key.items())
        raise UserError(f"These runs used different protocols or KPS definitions, so their numbers are not comparable: "
                        f"{lines}. Re-run them under one protocol, or pass --allow-mixed for one table per protocol.")
    tables = [_table(rs, reference, resamples, seed, confidence, allow_partial) for rs in by_key.values()]
    return tables if group_by == "method" else [pivot(t) for t in tables]


def _table(runs: list[Run], reference: str | None, resamples: int, seed: int, confidence: float,
           allow_partial: bool) -> Table:
    groups = _group_runs(runs)
    everyone = _check_partial(groups, allow_partial)
    if reference is not None and reference not in groups:
        raise UserError(f"--reference '{reference}' is not among the methods of these runs: {', '.join(sorted(groups))}.")
    available = [m for m in COLUMNS if all(m in r.results["metrics"][s] for r in runs for s in r.results["metrics"])]
    gt_cols = [m.name for m in GROUND_TRUTH if any(m.name in d for r in runs for d in r.ground_truth.values())]
    rows = []
    for gi, (key, by_subject) in enumerate(sorted(groups.items())):
        items = _items(by_subject)
        n_images, n_flagged = _generated_files(items)
        n_seeds = [len(rs) for rs in by_subject.values()]
        row = {"name": key, "n_subjects": len(by_subject), "n_seeds": min(n_seeds), "n_seeds_max": max(n_seeds),
               "seeds": {s: [r.train_seed for r in rs] for s, rs in by_subject.items()}, "n_images": n_images,
               "flagged": n_flagged / n_images if n_images else float("nan"), "partial": set(by_subject) != everyone}
        boot = prompt_resamples([r.stats[s] for r, s in items], resamples, seed + gi)
        for m in available:
            point = {s: [r.results["metrics"][s][m]["value"] for r in rs] for s, rs in by_subject.items()}
            row[m] = _estimate(point, list(torch.stack([b[m] for b in boot]).split(n_seeds)), seed + gi, confidence)
        for c in gt_cols:
            point = {s: [r.ground_truth[s][c] for r in rs if c in r.ground_truth.get(s, {})]
                     for s, rs in by_subject.items()}
            point = {s: v for s, v in point.items() if v}
            if point:
                const = [torch.tensor(v, dtype=torch.float64)[:, None].expand(-1, resamples) for v in point.values()]
                row[c] = _estimate(point, const, seed + gi, confidence)
        rows.append(row)
    tested = [m for m in TESTED if m in available] if reference is not None else []
    tests = [(row, m) for row in rows if row["name"] != reference for m in tested]
    for i, (row, m) in enumerate(tests):
        a, b = paired_prompts(_items(groups[row["name"]]), _items(groups[reference]), m)
        diff = M.paired_differences(a, b)
        row[f"p_{m}"], row[f"n_pairs_{m}"] = wilcoxon(diff), diff.numel()
        d, lo, hi = M.paired_median_difference(a, b, resamples, seed + i, confidence)
        row[f"diff_{m}"] = {"value": d, "ci_low": lo, "ci_high": hi}
    for (row, m), q in zip(tests, M.holm([row[f"p_{m}"] for row, m in tests])):
        row[f"p_holm_{m}"] = q
    if RANKED in available:  # a row whose kps is undefined (NaN) is not ranked and comes last
        order = sorted(rows, key=lambda r: (math.isnan(r[RANKED]["value"]), -r[RANKED]["value"]))
        for rank, r in enumerate(order, 1):
            r["rank"] = None if math.isnan(r[RANKED]["value"]) else rank
        rows = order
    prov = runs[0].provenance
    enc = prov["protocol"]["encoders"]
    footer = {
        "protocol": prov["protocol_name"], "protocol_version": prov["protocol_version"],
        "protocol_sha256": prov["protocol_sha256"], "kps_version": str(runs[0].results["kps_version"]),
        "clip": f"{enc['clip']['arch']} / {enc['clip']['weights']}",
        "dino": enc["dino"]["model"],
        "n_images_total": _generated_files([(r, s) for r in runs for s in r.results["metrics"]])[0],
        "n_runs": len(runs), **_setup(runs), "bootstrap": f"{resamples} resamples, seed {seed}",
        "confidence": confidence, "reference": reference, "n_tests": sum(not math.isnan(r[f"p_{m}"]) for r, m in tests),
    }
    return Table(rows, available + [c for c in gt_cols if any(c in r for r in rows)], footer, reference, tested)


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _span(values) -> str:
    """``"3"``, or ``"2–3"`` when the values differ."""
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def _base_model(prov: dict) -> str:
    """The base model a run used: a hub id with its revision, or a local folder with its weights' hash."""
    bm = prov.get("base_model")
    if not bm:
        return f"{prov['protocol']['base_model']} (revision not recorded: images scored from a manifest)"
    if bm.get("hub_id"):
        return f"{bm['hub_id']} revision {bm.get('revision') or 'unknown'}"
    return f"{bm['spec']} (local, sha256 {bm['sha256'][:12]})"


def _setup(runs: list[Run]) -> dict:
    """What the images were made with (the runs share one protocol): base model and revision, sampler, steps,
    guidance, resolution, prompts per subject, images per prompt, and each method's recipe hashes."""
    g = runs[0].provenance["protocol"]["generation"]
    recipes: dict[str, set] = {}
    for r in runs:
        recipes.setdefault(r.method, set()).add((r.training.get("recipe_sha256") or "")[:8] or "none recorded")
    return {"base_model": "; ".join(sorted({_base_model(r.provenance) for r in runs})), "sampler": g["scheduler"],
            "steps": g["steps"], "guidance_scale": g["guidance_scale"], "resolution": g["resolution"],
            "prompts_per_subject": _span([len(st.prompts) for r in runs for st in r.stats.values()]),
            "images_per_prompt": g["images_per_prompt"],
            "recipes": "; ".join(f"{m} {', '.join(sorted(shas))}" for m, shas in sorted(recipes.items()))}


def pivot(t: Table) -> Pivot:
    """The subject x method table of :data:`RANKED` from a leaderboard's rows: each cell the subject's mean over the
    method's training seeds [its interval over seeds and prompts], the last row the method's mean over subjects."""
    import pandas as pd

    if RANKED not in t.metrics:
        raise UserError(f"The subject x method table shows {RANKED}, which these runs do not report (their protocol's "
                        f"metrics leave it out). Use --group-by method.")
    records = []
    for row in t.rows:
        e = row[RANKED]
        for s, cell in e["by_subject"].items():
            records.append({"subject": s, "method": _name(row), **cell, "n_seeds": len(row["seeds"][s])})
        records.append({"subject": MEAN_ROW, "method": _name(row), "value": e["value"], "ci_low": e["ci_low"],
                        "ci_high": e["ci_high"], "n_seeds": pd.NA})
    fields = ["value", "ci_low", "ci_high", "n_seeds"]
    frame = pd.DataFrame(records).pivot(index="subject", columns="method", values=fields).swaplevel(axis=1)
    subjects = sorted(set(frame.index) - {MEAN_ROW}) + [MEAN_ROW]
    methods = [_name(row) for row in t.rows]
    return Pivot(frame.reindex(index=subjects, columns=pd.MultiIndex.from_product([methods, fields])), RANKED,
                 t.footer)


# ----------------------------------------------------------------------------- formats


def _fmt(entry: dict) -> str:
    return f"{entry['value']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"


def _fmt_diff(entry: dict) -> str:
    return f"{entry['value']:+.3f} [{entry['ci_low']:+.3f}, {entry['ci_high']:+.3f}]"


def _p(p: float) -> str:
    return "—" if p is None or math.isnan(p) else (f"{p:.1e}" if p < 1e-3 else f"{p:.3f}")


def _p_tex(p: float) -> str:
    if p is None or math.isnan(p):
        return "--"
    if p >= 1e-3:
        return f"{p:.3f}"
    mantissa, exponent = f"{p:.1e}".split("e")
    return f"${mantissa}\\times 10^{{{int(exponent)}}}$"


def _tex_num(s: str) -> str:
    """Minus signs of a formatted number or interval as math minus."""
    return s.replace("-", "$-$")


def _rank(row: dict, unranked: str = "—") -> str:
    """The row's rank; ``unranked`` for a row whose kps is undefined (NaN)."""
    if "rank" not in row:
        return ""
    return unranked if row["rank"] is None else str(row["rank"])


def _name(row: dict) -> str:
    return f"{row['name']} (partial)" if row["partial"] else row["name"]


def _seeds(row: dict) -> str:
    return _span([row["n_seeds"], row["n_seeds_max"]])


def _columns(t: Table, tex: bool = False) -> list[tuple[str, object]]:
    """The leaderboard's columns as (header, row -> cell text), for Markdown or (``tex``) LaTeX; in LaTeX the best
    value of each metric is bold."""
    dash = "--" if tex else "—"
    esc = latex_escape if tex else str
    num = _tex_num if tex else str
    best = {}
    for m in t.metrics if tex else ():
        vals = [r[m]["value"] for r in t.rows if m in r and not math.isnan(r[m]["value"])]
        if vals:
            best[m] = max(vals) if METRICS[m].higher_is_better else min(vals)

    def metric(m):
        def cell(r):
            if m not in r:
                return dash
            text = num(_fmt(r[m]))
            if best.get(m) == r[m]["value"]:
                value, rest = text.split(" [", 1)
                text = f"\\textbf{{{value}}} [{rest}"
            return text
        return cell

    def versus(m, key):
        def cell(r):
            if r["name"] == t.reference:
                return "ref"
            if key == "diff":
                d = r[f"diff_{m}"]
                return dash if math.isnan(d["value"]) else num(_fmt_diff(d))
            return _p_tex(r.get(f"p_holm_{m}")) if tex else _p(r.get(f"p_holm_{m}"))
        return cell

    cols = [("rank", lambda r: _rank(r, dash)), ("method", lambda r: esc(_name(r)))]
    cols += [(esc(m), metric(m)) for m in t.metrics]
    if RANKED in t.metrics:
        cols += [(esc(f"seed_sd({RANKED})"), lambda r: dash if math.isnan(r[RANKED]["seed_sd"])
                  else f"{r[RANKED]['seed_sd']:.3f}"), ("seeds", lambda r: esc(_seeds(r)))]
    for m in t.tested:
        cols += [(esc(f"Δ({m})"), versus(m, "diff")), (esc(f"p_holm({m})"), versus(m, "p"))]
    return cols + [("subjects", lambda r: str(r["n_subjects"])), ("images", lambda r: str(r["n_images"])),
                   ("flagged", lambda r: f"{r['flagged']:.3f}")]


def _setup_text(f: dict) -> str:
    """The footer's first sentences: protocol, how the images were made, encoders and image counts."""
    return (f"Protocol {f['protocol']} v{f['protocol_version']} (sha256 {f['protocol_sha256'][:16]}), kps_version "
            f"{f['kps_version']}. Base model {f['base_model']}; {f['sampler']} sampler, {f['steps']} steps, CFG "
            f"{f['guidance_scale']}, {f['resolution']} px; {f['prompts_per_subject']} prompts per subject, "
            f"{f['images_per_prompt']} images per prompt; recipes (sha256) {f['recipes']}. CLIP {f['clip']}; DINO "
            f"{f['dino']}; {f['n_images_total']} generated image files in {f['n_runs']} runs.")


def footer_text(t: Table) -> str:
    f = t.footer
    parts = [_setup_text(f),
             f"Each value is the mean over subjects of each subject's mean over its training seeds "
             f"[{f['confidence']:.0%} CI, nested bootstrap: subjects, then each drawn subject's training seeds, then "
             f"each drawn seed's prompts, all with replacement; {f['bootstrap']}]."]
    if RANKED in t.metrics:
        parts.append(f"seed_sd({RANKED}): the standard deviation of a subject's {RANKED} across training seeds, pooled "
                     f"over subjects (— with one seed each); seeds: training seeds per subject, from each run's "
                     f"training.json (a run without one, e.g. the base model, is one run of unknown seed).")
    parts.append("images: distinct generated image files; flagged: the share of them that came out NaN or black (left "
                 "out of the metrics with their seed partners).")
    if any(r["partial"] for r in t.rows):
        parts.append("(partial): a mean over fewer subjects than the other rows'.")
    if t.tested:
        ref, names = t.reference, ", ".join(t.tested)
        parts.append(
            f"Δ vs {ref}: the median of the paired differences, method minus {ref}, over (subject, prompt) pairs: a "
            f"pair is one subject and prompt (the same evaluation seeds on both sides), each side's value averaged "
            f"over its training seeds [{f['confidence']:.0%} CI, the nested bootstrap above, drawing each side's "
            f"seeds]. p_holm: two-sided Wilcoxon signed-rank test on those pairs, Holm-corrected over the "
            f"{f['n_tests']} tests of this table ({_count(len(t.rows) - 1, 'method')} x {names}). The test's unit is "
            f"the prompt, nested in subjects: the pairs of one subject are not independent, so p speaks for these "
            f"subjects' prompts, while the Δ interval, which resamples subjects and seeds too, speaks for new "
            f"subjects.")
    return " ".join(parts)


def to_markdown(t: Table) -> str:
    cols = _columns(t)
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r) for _, cell in cols) + " |" for r in t.rows]
    return "\n".join(lines) + "\n\n" + footer_text(t) + "\n"


def to_csv(t: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    h = ["rank", "method"]
    for m in t.metrics:
        h += [m, f"{m}_ci_low", f"{m}_ci_high", f"{m}_seed_sd"]
    for m in t.tested:
        h += [f"diff_{m}", f"diff_{m}_ci_low", f"diff_{m}_ci_high", f"p_{m}", f"p_holm_{m}", f"n_pairs_{m}"]
    h += ["n_subjects", "n_seeds", "n_seeds_max", "n_images", "flagged", "partial", "protocol", "protocol_version",
          "protocol_sha256", "kps_version"]
    w.writerow(h)
    f = t.footer
    for r in t.rows:
        line = [r.get("rank", ""), r["name"]]
        for m in t.metrics:
            e = r.get(m)
            line += [e["value"], e["ci_low"], e["ci_high"], e["seed_sd"]] if e else ["", "", "", ""]
        for m in t.tested:
            d = r.get(f"diff_{m}")
            line += ([d["value"], d["ci_low"], d["ci_high"], r[f"p_{m}"], r[f"p_holm_{m}"], r[f"n_pairs_{m}"]] if d
                     else [""] * 6)
        line += [r["n_subjects"], r["n_seeds"], r["n_seeds_max"], r["n_images"], r["flagged"], r["partial"],
                 f["protocol"], f["protocol_version"], f["protocol_sha256"], f["kps_version"]]
        w.writerow(line)
    return buf.getvalue()


def to_json_rows(t: Table) -> list[dict]:
    """One machine-readable row per (method, metric): the table's footer fields, then the row's."""
    out = []
    for r in t.rows:
        for m in t.metrics:
            if m in r:
                out.append({**t.footer, "method": r["name"], "metric": m, **r[m], "rank": r.get("rank"),
                            "seeds": r["seeds"],
                            "n_subjects": r["n_subjects"], "n_images": r["n_images"], "flagged": r["flagged"],
                            "partial": r["partial"], "median_diff_vs_reference": r.get(f"diff_{m}"),
                            "p_vs_reference": r.get(f"p_{m}"), "p_holm": r.get(f"p_holm_{m}"),
                            "n_pairs": r.get(f"n_pairs_{m}")})
    return out


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "—": "---", "–": "--",
          "Δ": r"$\Delta$", "×": r"$\times$"}


def latex_escape(s: str) -> str:
    return "".join(_LATEX.get(c, c) for c in s)


def _latex_table(spec: str, header: list[str], rows: list[list[str]], title: str, caption: str, label: str,
                 rule_before_last: bool = False) -> str:
    """A booktabs ``table`` environment (float, centred) with a caption (``title`` for the list of tables) and a
    label."""
    body = [" & ".join(cells) + r" \\" for cells in rows]
    if rule_before_last:
        body.insert(len(body) - 1, r"\midrule")
    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{" + spec + "}", r"\toprule",
             " & ".join(header) + r" \\", r"\midrule", *body, r"\bottomrule", r"\end{tabular}",
             f"\\caption[{latex_escape(title)}]{{{latex_escape(caption)}}}", r"\label{" + label + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _protocol(f: dict) -> str:
    return f"protocol {f['protocol']} v{f['protocol_version']}"


def _label(f: dict, suffix: str = "") -> str:
    return re.sub(r"[^A-Za-z0-9:.-]+", "-", f"tab:kps-bench-{f['protocol']}-{f['protocol_sha256'][:8]}{suffix}")


def to_latex(t: Table) -> str:
    """A booktabs ``table``: ``value [low, high]`` cells (the best value of each metric in bold); the footer, which
    names the base model, sampler settings, prompt and image counts and recipe hashes, is the caption."""
    cols = _columns(t, tex=True)
    rows = [[cell(r) for _, cell in cols] for r in t.rows]
    return _latex_table("rl" + "c" * (len(cols) - 2), [h for h, _ in cols], rows,
                        f"kps-bench leaderboard, {_protocol(t.footer)}", footer_text(t), _label(t.footer))


# ----------------------------------------------------------------------------- subject x method table


def pivot_footer(p: Pivot) -> str:
    f = p.footer
    text = (f"{_setup_text(f)} Each cell is the subject's {p.metric}, mean over the method's training seeds "
            f"[{f['confidence']:.0%} CI, bootstrap over its training seeds, then each drawn seed's prompts; "
            f"{f['bootstrap']}]; {MEAN_ROW}: the method's leaderboard value [nested bootstrap over subjects, training "
            f"seeds and prompts]. —: no run of the method on the subject, or undefined.")
    if any(m.endswith(" (partial)") for m in p.frame.columns.get_level_values(0)):
        text += " (partial): a method run on fewer subjects than the others."
    return text


def _methods(p: Pivot) -> list[str]:
    return list(dict.fromkeys(p.frame.columns.get_level_values(0)))


def _pivot_cells(p: Pivot, tex: bool = False) -> list[list[str]]:
    rows = []
    for subject, row in p.frame.iterrows():
        cells = [latex_escape(subject) if tex else subject]
        for m in _methods(p):
            e = {k: float(row[(m, k)]) for k in ("value", "ci_low", "ci_high")}
            cells.append(("--" if tex else "—") if math.isnan(e["value"]) else (_tex_num if tex else str)(_fmt(e)))
        rows.append(cells)
    return rows


def _pivot_header(p: Pivot, tex: bool = False) -> list[str]:
    return ["subject"] + [latex_escape(m) if tex else m for m in _methods(p)]


def pivot_markdown(p: Pivot) -> str:
    h = _pivot_header(p)
    lines = ["| " + " | ".join(h) + " |", "|" + "|".join("---" for _ in h) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in _pivot_cells(p)]
    return "\n".join(lines) + "\n\n" + pivot_footer(p) + "\n"


def pivot_csv(p: Pivot) -> str:
    flat = p.frame.copy()
    flat.columns = [m if k == "value" else f"{m}_{k}" for m, k in p.frame.columns]
    flat = flat.astype({c: "Int64" for c in flat.columns if c.endswith("_n_seeds")})
    flat.insert(0, "metric", p.metric)
    return flat.to_csv(index_label="subject")


def pivot_json_rows(p: Pivot) -> list[dict]:
    """One machine-readable row per (subject, method): the footer fields, then the cell's."""
    import pandas as pd

    out = []
    for subject, row in p.frame.iterrows():
        for m in _methods(p):
            n = row[(m, "n_seeds")]
            out.append({**p.footer, "subject": subject, "method": m, "metric": p.metric,
                        **{k: float(row[(m, k)]) for k in ("value", "ci_low", "ci_high")},
                        "n_seeds": None if pd.isna(n) else int(n)})
    return out


def pivot_latex(p: Pivot) -> str:
    h = _pivot_header(p, tex=True)
    return _latex_table("l" + "c" * (len(h) - 1), h, _pivot_cells(p, tex=True),
                        f"kps-bench {p.metric} per subject and method, {_protocol(p.footer)}", pivot_footer(p),
                        _label(p.footer, "-subjects"), rule_before_last=True)


_WRITERS = {Table: {"md": to_markdown, "csv": to_csv, "tex": to_latex, "json": to_json_rows},
            Pivot: {"md": pivot_markdown, "csv": pivot_csv, "tex": pivot_latex, "json": pivot_json_rows}}


def render(tables: list[Table | Pivot], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([row for t in tables for row in _WRITERS[type(t)]["json"](t)], indent=2) + "\n"
    return "\n".join(_WRITERS[type(t)][fmt](t) for t in tables)
