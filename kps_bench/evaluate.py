"""From a manifest and its stored embeddings to metric values with bootstrap confidence intervals.

Nothing here loads a model or reads an image: results are a function of ``images.jsonl`` and
``embeddings.safetensors`` alone, so anyone can recompute them.

The bootstrap unit is the trigger-free prompt of a subject: each resample draws prompts with
replacement and recomputes every metric from the drawn prompts' pooled sums (KPS from the
resampled identity and preservation). ``overall`` is the mean over subjects, resampled jointly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import metrics as M
from .rundir import ImageRecord

#: Metric name -> protocol metric that enables it.
REPORTED = {
    "kps": "kps", "identity": "identity", "preservation": "preservation",
    "clip_i": "clip_i", "clip_t": "clip_t", "dino": "dino",
    "diversity_base": "diversity", "diversity_adapter": "diversity", "diversity_ratio": "diversity",
    "vendi_base": "vendi", "vendi_adapter": "vendi", "vendi_ratio": "vendi",
}


@dataclass
class SubjectStats:
    """Per-prompt sums and counts (arrays of length n_prompts) from which every metric is a pooled ratio."""

    prompts: list[str]
    sums: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]

    def pooled(self, key: str, w: torch.Tensor) -> torch.Tensor:
        return M.weighted_ratio(self.sums[key], self.counts[key], w)

    def values(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every metric under prompt weights ``w [..., n_prompts]``."""
        v = {k: self.pooled(k, w) for k in ("identity", "preservation", "clip_i", "clip_t", "dino",
                                            "diversity_base", "diversity_adapter", "vendi_base", "vendi_adapter")}
        v["kps"] = M.kps(v["identity"], v["preservation"])
        v["diversity_ratio"] = v["diversity_adapter"] / v["diversity_base"]
        v["vendi_ratio"] = v["vendi_adapter"] / v["vendi_base"]
        return v


def subject_stats(records: list[ImageRecord], emb: dict[str, torch.Tensor], subject: str) -> SubjectStats:
    """Per-prompt statistics of one subject. Flagged (NaN/black) images are left out."""
    rows = [r for r in records if r.subject == subject and r.valid]
    refs = [r for r in rows if r.role == "reference"]
    ref_clip = _stack(emb, "clip", refs)
    ref_dino = _stack(emb, "dino", refs)
    prompt_ids = sorted({r.prompt_index for r in rows if r.role != "reference"})
    keys = ("identity", "preservation", "clip_i", "clip_t", "dino",
            "diversity_base", "diversity_adapter", "vendi_base", "vendi_adapter")
    sums = {k: torch.zeros(len(prompt_ids), dtype=torch.float64) for k in keys}
    counts = {k: torch.zeros(len(prompt_ids), dtype=torch.float64) for k in keys}
    prompts = []
    for j, p in enumerate(prompt_ids):
        here = [r for r in rows if r.role != "reference" and r.prompt_index == p]
        prompts.append(here[0].prompt_without_trigger)
        trig = [r for r in here if r.role == "adapter" and r.has_trigger]
        base = [r for r in here if r.role == "base" and not r.has_trigger]
        adapt = [r for r in here if r.role == "adapter" and not r.has_trigger]
        if trig:
            tc = _stack(emb, "clip", trig)
            text = emb[f"clip_text/{subject}/{p}"][None]
            _add(sums, counts, j, "clip_t", M.cosine_matrix(tc, text).flatten())
            if refs:
                cos = M.cosine_matrix(tc, ref_clip).flatten()
                _add(sums, counts, j, "clip_i", cos)
                _add(sums, counts, j, "identity", M.similarity01(cos))
                _add(sums, counts, j, "dino", M.cosine_matrix(_stack(emb, "dino", trig), ref_dino).flatten())
        pairs = _seed_pairs(base, adapt)
        if pairs:
            b = _stack(emb, "clip", [x for x, _ in pairs])
            a = _stack(emb, "clip", [y for _, y in pairs])
            _add(sums, counts, j, "preservation", M.similarity01(M.paired_cosine(b, a)))
        for role, group in (("base", base), ("adapter", adapt)):
            if len(group) >= 2:
                d = _stack(emb, "dino", group)
                _add(sums, counts, j, f"diversity_{role}", torch.tensor([M.mean_pairwise_cosine_distance(d)], dtype=torch.float64))
                _add(sums, counts, j, f"vendi_{role}", torch.tensor([M.vendi_score(d)], dtype=torch.float64))
    return SubjectStats(prompts, sums, counts)


def _stack(emb, kind: str, rows: list[ImageRecord]) -> torch.Tensor:
    if not rows:
        return torch.zeros(0, 1)
    return torch.stack([emb[f"{kind}/{r.id}"] for r in rows])


def _add(sums, counts, j: int, key: str, values: torch.Tensor) -> None:
    sums[key][j] += values.to(torch.float64).sum()
    counts[key][j] += values.numel()


def _seed_pairs(base: list[ImageRecord], adapt: list[ImageRecord]) -> list[tuple[ImageRecord, ImageRecord]]:
    by_seed = {r.seed: r for r in base}
    return [(by_seed[r.seed], r) for r in adapt if r.seed in by_seed]


def compute_results(records: list[ImageRecord], emb: dict[str, torch.Tensor], metric_names, resamples: int = 1000,
                    seed: int = 0, confidence: float = 0.95) -> dict:
    """``{"metrics": {subject: {metric: {value, ci_low, ci_high, n}}}, "overall": {...}, "counts": {...}}``."""
    wanted = [m for m, source in REPORTED.items() if source in metric_names]
    subjects = sorted({r.subject for r in records})
    per_subject, boot_values, point_values = {}, {}, {}
    for i, s in enumerate(subjects):
        st = subject_stats(records, emb, s)
        n_prompts = len(st.prompts)
        ones = torch.ones(n_prompts, dtype=torch.float64)
        w = M.bootstrap_weights(n_prompts, resamples, seed + i)
        point, boot = st.values(ones), st.values(w)
        point_values[s], boot_values[s] = point, boot
        per_subject[s] = {m: _entry(point[m], boot[m], _n(st, m), confidence) for m in wanted}
        per_subject[s]["n_prompts"] = n_prompts
    overall = {}
    for m in wanted:
        point = torch.stack([point_values[s][m] for s in subjects]).mean(0)
        boot = torch.stack([boot_values[s][m] for s in subjects]).mean(0)
        overall[m] = _entry(point, boot, sum(per_subject[s][m]["n"] for s in subjects), confidence)
    overall["n_subjects"] = len(subjects)
    return {"metrics": per_subject, "overall": overall, "counts": image_counts(records)}


def _n(st: SubjectStats, metric: str) -> int:
    """Observations behind a metric: pairs, images, or prompts (diversity, vendi)."""
    base = {"kps": "identity", "diversity_ratio": "diversity_adapter", "vendi_ratio": "vendi_adapter"}.get(metric, metric)
    return int(st.counts[base].sum())


def _entry(point: torch.Tensor, boot: torch.Tensor, n: int, confidence: float) -> dict:
    lo, hi = M.percentile_interval(boot, confidence)
    return {"value": float(point), "ci_low": lo, "ci_high": hi, "n": n}


def image_counts(records: list[ImageRecord]) -> dict:
    """Images per role, and how many were flagged (NaN or black) and so left out of the metrics."""
    out = {role: sum(r.role == role for r in records) for role in ("reference", "base", "adapter")}
    out["flagged"] = sum(not r.valid for r in records)
    out["flagged_ids"] = [r.id for r in records if not r.valid]
    return out
