"""Metric math: pure functions on embedding tensors (no models, no files).

All image/text embeddings are L2-normalised rows, shape ``[n, d]``. Cosines are computed in float64
as ``1 - ||a - b||^2 / 2`` (equal to ``a.b`` for unit vectors), which makes identical embeddings
give a cosine of exactly 1.

Definitions (per subject; see README "Metrics"):

- ``clip_t``       = mean over trigger images of cos(E_clip(image), T_clip(trigger-free prompt))
- ``clip_i``       = mean over (trigger image, reference) pairs of cos(E_clip, E_clip)
- ``dino``         = the same pairs with E_dino
- ``identity``     = mean over the same pairs of (1 + cos_clip) / 2
- ``preservation`` = mean over seed-paired (base, adapter) trigger-free images of (1 + cos_clip) / 2
- ``kps``          = 2 * identity * preservation / (identity + preservation)
- ``diversity``    = mean over trigger-free prompts of the mean pairwise cosine distance (1 - cos,
  distinct pairs only) of the DINO embeddings of that prompt's images
- ``vendi``        = mean over trigger-free prompts of exp(entropy of the eigenvalues of K / n), K = cosine kernel

Chance-corrected scores (kps_version 2):

- ``identity_base``      = ``identity`` of the base model's trigger images (same prompts and seeds)
- ``identity_ceiling``   = mean over ordered pairs of distinct references of (1 + cos_clip) / 2
- ``identity_gain``      = (identity - identity_base) / (identity_ceiling - identity_base)
- ``preservation_floor`` = mean over pairs of base trigger-free images of one prompt (different seeds) of
  (1 + cos_clip) / 2
- ``preservation_gain``  = (preservation - preservation_floor) / (1 - preservation_floor)
- ``kps_gain``           = harmonic mean of clip(identity_gain, 0, 1) and clip(preservation_gain, 0, 1), 0 when
  either is 0 (even when the other is undefined)

A gain is NaN (undefined) where its denominator is at most :data:`MIN_SPAN`.

The metric-validity study (:mod:`kps_bench.validity`) ranks adapters: :func:`spearman` (average ranks for ties) with
a bootstrap over adapters drawn by :func:`resample_indices`.
"""

from __future__ import annotations

import math

import torch


def _unit64(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All-pairs cosine, ``[n, d] x [m, d] -> [n, m]`` float64."""
    a, b = _unit64(a), _unit64(b)
    sq = (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)
    return (1.0 - sq / 2.0).clamp(-1.0, 1.0)


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of seed-paired rows, ``[n, d] x [n, d] -> [n]`` float64."""
    if a.shape != b.shape:
        raise ValueError(f"paired_cosine needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = _unit64(a), _unit64(b)
    return (1.0 - (a - b).pow(2).sum(-1) / 2.0).clamp(-1.0, 1.0)


def similarity01(cos: torch.Tensor) -> torch.Tensor:
    """CLIP similarity mapped to [0, 1]: (1 + cos) / 2."""
    return (1.0 + cos) / 2.0


def harmonic_mean(a, b):
    """2ab / (a + b); 0 where a + b == 0; NaN (undefined) where a or b is NaN. Works on floats and tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        s = a + b
        return torch.where(s == 0, torch.zeros_like(s), 2 * a * b / torch.where(s == 0, torch.ones_like(s), s))
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def kps(identity, preservation):
    """Knowledge Preservation Score (Park et al. 2024): harmonic mean of identity and preservation."""
    return harmonic_mean(identity, preservation)


#: The smallest denominator (ceiling - chance level) for which a gain is defined.
MIN_SPAN = 0.01


def gain(value: torch.Tensor, chance, ceiling) -> torch.Tensor:
    """(value - chance) / (ceiling - chance), float64: 0 at the chance level, 1 at the ceiling; NaN where
    ceiling - chance <= :data:`MIN_SPAN` (or any input is NaN)."""
    value = torch.as_tensor(value, dtype=torch.float64)
    span = torch.as_tensor(ceiling, dtype=torch.float64) - torch.as_tensor(chance, dtype=torch.float64)
    ok = span > MIN_SPAN
    return torch.where(ok, (value - chance) / torch.where(ok, span, torch.ones_like(span)),
                       torch.full_like(value * span, float("nan")))


def preservation_gain(preservation: torch.Tensor, floor) -> torch.Tensor:
    """:func:`gain` of preservation between the floor (two seeds of the base model) and 1 (the base's own image)."""
    return gain(preservation, floor, 1.0)


def kps_gain(identity_gain: torch.Tensor, preservation_gain: torch.Tensor) -> torch.Tensor:
    """Harmonic mean of the two gains clipped to [0, 1]. 0 when either is 0 (or below), even when the other is NaN
    (no gain on one side is no gain, whatever the other); otherwise NaN when either is NaN."""
    a = torch.as_tensor(identity_gain, dtype=torch.float64).clamp(0.0, 1.0)
    b = torch.as_tensor(preservation_gain, dtype=torch.float64).clamp(0.0, 1.0)
    h = harmonic_mean(a, b)
    return torch.where((a == 0) | (b == 0), torch.zeros_like(h), h)


def ratio(adapter: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """adapter / base (e.g. ``diversity_ratio``)."""
    return adapter / base


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The entries ``m[i, j]`` with i != j of a square matrix, ``[n, n] -> [n * (n - 1)]``."""
    n = m.shape[0]
    return m[~torch.eye(n, dtype=torch.bool)]


def mean_pairwise_cosine_distance(emb: torch.Tensor) -> float:
    """Intra-set diversity: mean of 1 - cos over the n(n-1)/2 distinct pairs (the diagonal is excluded)."""
    n = emb.shape[0]
    if n < 2:
        raise ValueError("diversity needs at least 2 images")
    d = 1.0 - cosine_matrix(emb, emb)
    iu = torch.triu_indices(n, n, offset=1)
    return float(d[iu[0], iu[1]].mean())


def vendi_score(emb: torch.Tensor) -> float:
    """Vendi score (Friedman & Dieng 2023): exp(-sum(l * log l)) over the eigenvalues l of K/n, K[i,j] = cos."""
    n = emb.shape[0]
    k = cosine_matrix(emb, emb) / n
    eig = torch.linalg.eigvalsh(k).clamp(min=0.0)
    eig = eig[eig > 1e-12]
    return float(torch.exp(-(eig * eig.log()).sum()))


def bootstrap_weights(n_units: int, resamples: int, seed: int) -> torch.Tensor:
    """Resampling counts ``[resamples, n_units]`` (float64): how often each unit (prompt) is drawn. With no unit
    the weights are empty, and every metric pooled under them is NaN."""
    if n_units == 0:
        return torch.zeros(resamples, 0, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n_units, (resamples, n_units), generator=g)
    w = torch.zeros(resamples, n_units, dtype=torch.float64)
    w.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    return w


def weighted_ratio(sums: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Pooled mean of per-unit ``sums / counts`` under unit ``weights [..., n_units]``: sum(w*s) / sum(w*c)."""
    num = (weights * sums.to(torch.float64)).sum(-1)
    den = (weights * counts.to(torch.float64)).sum(-1)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(den, float("nan")))


def percentile_interval(samples: torch.Tensor, confidence: float) -> tuple[float, float]:
    """Percentile bootstrap interval of ``samples [resamples]`` ignoring NaNs."""
    s = samples[~torch.isnan(samples)]
    if s.numel() == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - confidence) / 2.0
    q = torch.quantile(s, torch.tensor([alpha, 1.0 - alpha], dtype=s.dtype))
    return float(q[0]), float(q[1])


def resampled_mean(rows: torch.Tensor, seed: int) -> torch.Tensor:
    """Bootstrap of the mean over units (subjects, or one subject's training seeds), ``[units, resamples] ->
    [resamples]``: replicate ``b`` draws the units with replacement (generator seeded with ``seed``) and averages the
    drawn units' resample ``b``."""
    n, resamples = rows.shape
    return rows.T.gather(1, resample_indices(n, resamples, seed)).mean(1)


def pooled_sd(groups) -> float:
    """Standard deviation within groups (e.g. one subject's values over training seeds), pooled over the groups:
    sqrt(sum of squared deviations from each group's mean / sum of (group size - 1)). NaN values are left out; NaN
    when no group has two values."""
    ss, df = 0.0, 0
    for g in groups:
        g = torch.as_tensor(g, dtype=torch.float64)
        g = g[~torch.isnan(g)]
        if g.numel() >= 2:
            ss += float((g - g.mean()).pow(2).sum())
            df += g.numel() - 1
    return (ss / df) ** 0.5 if df else float("nan")


def holm(pvalues) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the given order: the i-th smallest of m p-values becomes the running
    maximum of min(1, (m - i + 1) p). NaN p-values (no test) stay NaN and are not counted in m."""
    p = [float(x) for x in pvalues]
    order = sorted((i for i, x in enumerate(p) if not math.isnan(x)), key=lambda i: p[i])
    out, running = [float("nan")] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        out[i] = running
    return out


def paired_differences(a, b) -> torch.Tensor:
    """The paired differences of prompts nested in subjects: ``a[i]`` and ``b[i]`` hold subject ``i``'s per-prompt
    values ``[training seeds, prompts]`` of two methods (NaN where a seed has none), with the same prompts in the
    same columns. Each side is averaged over its seeds; prompts undefined on either side are left out."""
    d = torch.cat([torch.as_tensor(x, dtype=torch.float64).nanmean(0) - torch.as_tensor(y, dtype=torch.float64)
                   .nanmean(0) for x, y in zip(a, b)]) if len(a) else torch.zeros(0, dtype=torch.float64)
    return d[~torch.isnan(d)]


def paired_median_difference(a, b, resamples: int, seed: int, confidence: float) -> tuple[float, float, float]:
    """The median of :func:`paired_differences` and its percentile interval from a nested bootstrap: each
    replicate draws subjects with replacement, then, per drawn subject, each side's training seeds and then the
    prompts, all with replacement. ``(median, ci_low, ci_high)``; NaN without a pair."""
    d = paired_differences(a, b)
    if d.numel() == 0:
        return float("nan"), float("nan"), float("nan")
    g = torch.Generator().manual_seed(seed)
    a = [torch.as_tensor(x, dtype=torch.float64) for x in a]
    b = [torch.as_tensor(y, dtype=torch.float64) for y in b]
    width = max(x.shape[1] for x in a)
    per_subject = torch.full((len(a), resamples, width), float("nan"), dtype=torch.float64)

    def seed_means(x: torch.Tensor) -> torch.Tensor:  # [resamples, prompts]
        return x[torch.randint(0, x.shape[0], (resamples, x.shape[0]), generator=g)].nanmean(1)

    for i, (x, y) in enumerate(zip(a, b)):
        diff = seed_means(x) - seed_means(y)
        n_prompts = x.shape[1]
        if n_prompts == 0:
            continue
        per_subject[i, :, :n_prompts] = diff.gather(1, torch.randint(0, n_prompts, (resamples, n_prompts),
                                                                       generator=g))
    pick = torch.randint(0, len(a), (resamples, len(a)), generator=g)
    drawn = per_subject[pick, torch.arange(resamples)[:, None]].reshape(resamples, -1)
    lo, hi = percentile_interval(torch.nanquantile(drawn, 0.5, dim=1), confidence)
    return float(torch.quantile(d, 0.5)), lo, hi


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last dimension, ties given the mean of the ranks they span: ``[..., n] -> [..., n]``
    float64 (rank = count of smaller values + (count of equal values + 1) / 2)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    smaller = (x[..., None, :] < x[..., :, None]).sum(-1, dtype=torch.float64)
    equal = (x[..., None, :] == x[..., :, None]).sum(-1, dtype=torch.float64)
    return smaller + (equal + 1.0) / 2.0


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation along the last dimension: the Pearson correlation of the average ranks,
    ``[..., n] x [..., n] -> [...]`` float64. NaN where either side is constant (no ranking to compare)."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(-1, keepdim=True), ry - ry.mean(-1, keepdim=True)
    den = (rx.pow(2).sum(-1) * ry.pow(2).sum(-1)).sqrt()
    ok = den > 1e-12
    return torch.where(ok, (rx * ry).sum(-1) / torch.where(ok, den, torch.ones_like(den)),
                       torch.full_like(den, float("nan")))


def resample_indices(n_units: int, resamples: int, seed: int) -> torch.Tensor:
    """Bootstrap draws ``[resamples, n_units]`` of unit indices (with replacement, generator seeded with ``seed``):
    statistics computed on the same draws are paired."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_units, (resamples, n_units), generator=g)
