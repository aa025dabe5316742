"""From a manifest and its stored embeddings to metric values with bootstrap confidence intervals.

Nothing here loads a model or reads an image: results are a function of ``images.jsonl`` and
``embeddings.safetensors`` alone, so anyone can recompute them. Only the metrics a protocol enables (see
:mod:`kps_bench.registry`), and those they are computed from, are computed, so only their embeddings are read.

The bootstrap unit is the trigger-free prompt of a subject: each resample draws prompts with replacement and
recomputes every metric from the drawn prompts' pooled sums (derived metrics such as KPS from the resampled
inputs). The references are fixed, not resampled, so ``identity_ceiling`` has a point interval. ``overall`` is the
mean over subjects of their values; its interval is a two-level bootstrap (:func:`kps_bench.metrics.resampled_mean`
of the subjects' prompt resamples: subjects with replacement, then each drawn subject's prompts), the one leaderboards
use (with training seeds between the two levels), so a leaderboard row of one run agrees with its ``overall``.

Base and adapter images of one (prompt, trigger or not, seed) are seed partners: a flagged (NaN or black) image is
left out together with its partner, and each metric counts the images it left out (``flagged``).
"""

from __future__ import annotations

from collections import Counter
from functools import cache
from dataclasses import dataclass, field

import torch

from . import metrics as M
from . import registry as R
from .errors import UserError
from .rundir import ImageRecord


@dataclass
class SubjectStats:
    """Per-prompt sums and counts (arrays of length n_prompts) from which every leaf metric is a pooled ratio.
    ``fixed`` holds (sum, count) of the statistics of the references alone, which resampling prompts leaves
    unchanged; ``names`` are the metrics to compute; ``left_out`` counts flagged images (and their seed partners) left
    out, per image set."""

    prompts: list[str]
    sums: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]
    names: tuple[str, ...]
    fixed: dict[str, tuple[float, int]] = field(default_factory=dict)
    left_out: dict[str, int] = field(default_factory=dict)

    def pooled(self, key: str, w: torch.Tensor) -> torch.Tensor:
        if key in self.fixed:
            s, c = self.fixed[key]
            return torch.full(w.shape[:-1], s / c if c else float("nan"), dtype=torch.float64)
        return M.weighted_ratio(self.sums[key], self.counts[key], w)

    def values(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every metric of ``names`` (and their inputs) under prompt weights ``w [..., n_prompts]``."""
        v: dict[str, torch.Tensor] = {}

        def get(name: str) -> torch.Tensor:
            if name not in v:
                m = R.METRICS[name]
                v[name] = (getattr(M, m.formula)(*(get(i) for i in m.inputs)) if m.inputs else self.pooled(name, w))
            return v[name]

        for name in self.names:
            get(name)
        return v

    def n(self, name: str) -> int:
        """Observations behind a metric: pairs, images, or prompts (diversity, vendi); a derived metric's first
        input's."""
        m = R.METRICS[name]
        if m.inputs:
            return self.n(m.inputs[0])
        return self.fixed[name][1] if name in self.fixed else int(self.counts[name].sum())

    def flagged(self, name: str) -> int:
        """Images left out of a metric because they, or their seed partners, are flagged."""
        return sum(self.left_out.get(s, 0) for s in R.image_sets(name))


def check_seeds(records: list[ImageRecord], where: str) -> None:
    """Base and adapter images are paired by seed: each needs one, unique within its subject, prompt, role and
    trigger. Raises a UserError naming the rows otherwise."""
    problems, groups = [], {}
    for r in records:
        if r.role == "reference":
            continue
        if r.seed is None:
            problems.append(f"'{r.id}' has no seed")
        else:
            groups.setdefault((r.subject, r.prompt_index, r.role, r.has_trigger, r.seed), []).append(r.id)
    for (subject, p, role, trig, seed), ids in groups.items():
        if len(ids) > 1:
            problems.append(f"seed {seed} is repeated by {', '.join(repr(i) for i in ids)} ({role}, "
                            f"{'trigger' if trig else 'trigger-free'} prompt {p} of subject '{subject}')")
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise UserError(f"{where}: {shown}. Base and adapter images are paired by seed, so every base or adapter "
                        f"image needs the integer seed it was generated with, unique within its subject, prompt, role "
                        f"and trigger. Fix the 'seed' fields (or drop the duplicate lines).")


def subject_stats(records: list[ImageRecord], emb: dict[str, torch.Tensor], subject: str, names) -> SubjectStats:
    """Per-prompt statistics of one subject for the metrics ``names`` (and their inputs)."""
    need = set(R.closure(names))
    rows = [r for r in records if r.subject == subject]
    all_refs = [r for r in rows if r.role == "reference"]
    refs = [r for r in all_refs if r.valid]
    left_out = Counter({"reference": len(all_refs) - len(refs)})
    ref = cache(lambda kind: _stack(emb, kind, refs))  # the references' embeddings, stacked once per subject
    fixed = {}
    if "identity_ceiling" in need:
        r = ref("clip") if refs else torch.zeros(0, 1)
        sims = M.off_diagonal(M.similarity01(M.cosine_matrix(r, r)))
        fixed["identity_ceiling"] = (float(sims.sum()), sims.numel())
    prompt_ids = sorted({r.prompt_index for r in rows if r.role != "reference"})
    leaves = [n for n in R.closure(names) if not R.METRICS[n].inputs and n not in fixed]
    sums = {k: torch.zeros(len(prompt_ids), dtype=torch.float64) for k in leaves}
    counts = {k: torch.zeros(len(prompt_ids), dtype=torch.float64) for k in leaves}
    prompts = []

    def add(j: int, key: str, values: torch.Tensor) -> None:
        if key in need:
            sums[key][j] += values.to(torch.float64).sum()
            counts[key][j] += values.numel()

    for j, p in enumerate(prompt_ids):
        here = [r for r in rows if r.role != "reference" and r.prompt_index == p]
        prompts.append(here[0].prompt_without_trigger)
        sets = {}
        for kind, trig in (("trigger", True), ("free", False)):
            base = [r for r in here if r.role == "base" and r.has_trigger == trig]
            adapt = [r for r in here if r.role == "adapter" and r.has_trigger == trig]
            sets[f"base_{kind}"], sets[f"adapter_{kind}"] = _drop_flagged_pairs(base, adapt)
            left_out[f"base_{kind}"] += len(base) - len(sets[f"base_{kind}"])
            left_out[f"adapter_{kind}"] += len(adapt) - len(sets[f"adapter_{kind}"])
        trig = sets["adapter_trigger"]
        trig_clip = _stack(emb, "clip", trig) if trig and need & {"clip_t", "clip_i", "identity"} else None
        if trig_clip is not None and "clip_t" in need:
            add(j, "clip_t", M.cosine_matrix(trig_clip, emb[f"clip_text/{subject}/{p}"][None]).flatten())
        if refs and trig_clip is not None and need & {"clip_i", "identity"}:
            cos = M.cosine_matrix(trig_clip, ref("clip")).flatten()
            add(j, "clip_i", cos)
            add(j, "identity", M.similarity01(cos))
        if refs and trig and "dino" in need:
            add(j, "dino", M.cosine_matrix(_stack(emb, "dino", trig), ref("dino")).flatten())
        if refs and sets["base_trigger"] and "identity_base" in need:
            add(j, "identity_base", M.similarity01(M.cosine_matrix(_stack(emb, "clip", sets["base_trigger"]),
                                                                   ref("clip")).flatten()))
        base, adapt = sets["base_free"], sets["adapter_free"]
        pairs = _seed_pairs(base, adapt)
        if pairs and "preservation" in need:
            add(j, "preservation", M.similarity01(M.paired_cosine(_stack(emb, "clip", [b for b, _ in pairs]),
                                                                  _stack(emb, "clip", [a for _, a in pairs]))))
        if len(base) >= 2 and "preservation_floor" in need:
            b = _stack(emb, "clip", base)
            add(j, "preservation_floor", M.off_diagonal(M.similarity01(M.cosine_matrix(b, b))))
        for role, group in (("base", base), ("adapter", adapt)):
            if len(group) >= 2 and need & {f"diversity_{role}", f"vendi_{role}"}:
                d = _stack(emb, "dino", group)
                if f"diversity_{role}" in need:
                    add(j, f"diversity_{role}", torch.tensor([M.mean_pairwise_cosine_distance(d)], dtype=torch.float64))
                if f"vendi_{role}" in need:
                    add(j, f"vendi_{role}", torch.tensor([M.vendi_score(d)], dtype=torch.float64))
    return SubjectStats(prompts, sums, counts, tuple(names), fixed, dict(left_out))


def _stack(emb, kind: str, rows: list[ImageRecord]) -> torch.Tensor:
    return torch.stack([emb[f"{kind}/{r.id}"] for r in rows])


def _drop_flagged_pairs(base: list[ImageRecord], adapt: list[ImageRecord]):
    """``base`` and ``adapt`` without flagged images and without the seed partners of flagged images."""
    bad = {r.seed for r in base + adapt if not r.valid}
    return [r for r in base if r.seed not in bad], [r for r in adapt if r.seed not in bad]


def _seed_pairs(base: list[ImageRecord], adapt: list[ImageRecord]) -> list[tuple[ImageRecord, ImageRecord]]:
    by_seed = {r.seed: r for r in base}
    return [(by_seed[r.seed], r) for r in adapt if r.seed in by_seed]


def prompt_resamples(stats: list[SubjectStats], resamples: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Each subject's metrics under ``resamples`` resamples of its prompts (``[resamples]`` per metric); subject ``i``
    of the list draws with seed ``seed * 7919 + i + 1``."""
    return [st.values(M.bootstrap_weights(len(st.prompts), resamples, seed * 7919 + i + 1))
            for i, st in enumerate(stats)]


def mean_over_seeds(per_subject: list[torch.Tensor], seed: int) -> torch.Tensor:
    """Each subject's mean over its training seeds under the bootstrap, ``[[seeds_i, resamples]] -> [subjects,
    resamples]``: :func:`kps_bench.metrics.resampled_mean` of subject ``i``'s rows (each seed's prompt resamples)
    with seed ``seed * 7919 + 104729 + i``. With one seed a subject's row is its prompt resamples unchanged."""
    return torch.stack([M.resampled_mean(t, seed * 7919 + 104729 + i) for i, t in enumerate(per_subject)])


def compute_results(records: list[ImageRecord], emb: dict[str, torch.Tensor], metric_names, resamples: int = 1000,
                    seed: int = 0, confidence: float = 0.95) -> dict:
    """``{"metrics": {subject: {metric: {value, ci_low, ci_high, n, flagged}}}, "overall": {...}, "counts": {...},
    "warnings": [...]}`` for the metrics the protocol metrics ``metric_names`` enable."""
    check_seeds(records, "images.jsonl")
    wanted = R.reported(metric_names)
    subjects = sorted({r.subject for r in records})
    stats = [subject_stats(records, emb, s, wanted) for s in subjects]
    boot = prompt_resamples(stats, resamples, seed)
    point = [st.values(torch.ones(len(st.prompts), dtype=torch.float64)) for st in stats]
    per_subject = {}
    for s, st, p, b in zip(subjects, stats, point, boot):
        per_subject[s] = {m: _entry(p[m], b[m], st.n(m), st.flagged(m), confidence) for m in wanted}
        per_subject[s]["n_prompts"] = len(st.prompts)
    overall = {}
    for m in wanted:
        overall[m] = _entry(torch.stack([p[m] for p in point]).mean(),
                            M.resampled_mean(torch.stack([b[m] for b in boot]), seed),
                            sum(st.n(m) for st in stats), sum(st.flagged(m) for st in stats), confidence)
    overall["n_subjects"] = len(subjects)
    return {"metrics": per_subject, "overall": overall, "counts": image_counts(records),
            "warnings": undefined_gains(dict(zip(subjects, point)))}


def undefined_gains(point: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """A warning per subject (``point``: subject -> its metric values) whose gain is NaN because its denominator
    (ceiling - chance level) is at most :data:`kps_bench.metrics.MIN_SPAN`. A gain's registry inputs are (value,
    chance level[, ceiling]); without a ceiling it is 1."""
    out = []
    for s, v in point.items():
        for m in R.METRICS.values():
            if m.formula not in ("gain", "preservation_gain") or m.name not in v:
                continue
            chance, ceiling = m.inputs[1], (m.inputs[2] if len(m.inputs) > 2 else None)
            span = (float(v[ceiling]) if ceiling else 1.0) - float(v[chance])
            if span <= M.MIN_SPAN:
                top = ceiling or "1"
                out.append(f"{m.name} of subject '{s}' is undefined (NaN): {top} - {chance} = {span:.4f} <= "
                           f"{M.MIN_SPAN}, so there is no room between the chance level and the ceiling to measure a "
                           f"gain in.")
    return out


def _entry(point: torch.Tensor, boot: torch.Tensor, n: int, flagged: int, confidence: float) -> dict:
    lo, hi = M.percentile_interval(boot, confidence)
    return {"value": float(point), "ci_low": lo, "ci_high": hi, "n": n, "flagged": flagged}


def image_counts(records: list[ImageRecord]) -> dict:
    """Distinct image files (not manifest lines: a base run lists each base image under two roles) per role, of the
    generated ones (base and adapter together), and how many of those were flagged (NaN or black) and so left out of
    the metrics (any role), with the flagged lines' ids."""
    def files(rows) -> int:
        return len({r.path for r in rows})

    generated = [r for r in records if r.role != "reference"]
    out = {role: files([r for r in records if r.role == role]) for role in ("reference", "base", "adapter")}
    out["generated"] = files(generated)
    out["flagged"] = files([r for r in records if not r.valid])
    out["flagged_ids"] = [r.id for r in records if not r.valid]
    return out
