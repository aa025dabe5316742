"""`kps-bench compare`: one method against another, paired over (subject, training seed), by hand."""

import math
from pathlib import Path

import pytest
import torch
from scipy.stats import wilcoxon

from kps_bench import metrics as M
from kps_bench.compare import compare, pairs, render
from kps_bench.errors import UserError
from kps_bench.leaderboard import Run


def run(method, seed, values, truth=None):
    """A run of ``method`` with training seed ``seed``: ``values`` subject -> {metric: value}."""
    results = {"metrics": {s: {m: {"value": v} for m, v in d.items()} for s, d in values.items()},
               "provenance": {"adapter": {"training": {"method": method, "seed": seed}}}, "kps_version": 2}
    return Run(Path(f"/runs/{method}-{seed}"), method, results, {}, truth or {})


CAT = [run("cat", 0, {"a": {"kps": 0.80}, "b": {"kps": 0.70}}, {"a": {"gt_diversity_ratio": 0.9}}),
       run("cat", 1, {"a": {"kps": 0.82}, "b": {"kps": 0.69}})]
LORA = [run("lora", 0, {"a": {"kps": 0.75}, "b": {"kps": 0.72}}, {"a": {"gt_diversity_ratio": 0.5}}),
        run("lora", 1, {"a": {"kps": 0.78}, "b": {"kps": 0.60}}),
        run("lora", 2, {"a": {"kps": 0.99}, "b": {"kps": 0.99}})]  # no cat seed 2: unpaired


def test_pairs_match_subject_and_training_seed():
    assert pairs(CAT + LORA, "cat", "lora", "kps") == [("a", 0, 0.80, 0.75), ("a", 1, 0.82, 0.78),
                                                       ("b", 0, 0.70, 0.72), ("b", 1, 0.69, 0.60)]
    assert pairs(CAT + LORA, "cat", "lora", "gt_diversity_ratio") == [("a", 0, 0.9, 0.5)]
    assert pairs(CAT + LORA, "cat", "lora", "dino") == []


def test_compare_by_hand():
    out = compare(CAT + LORA, "cat", "lora", ("kps", "gt_diversity_ratio"), resamples=500, seed=3)
    kps, gt = out
    d = torch.tensor([0.05, 0.04, -0.02, 0.09], dtype=torch.float64)
    assert (kps.n, kps.method_mean, kps.reference_mean) == (4, pytest.approx(0.7525), pytest.approx(0.7125))
    assert kps.difference == pytest.approx(0.04)
    lo, hi = M.percentile_interval(d[M.resample_indices(4, 500, 3)].mean(-1), 0.95)
    assert (kps.ci_low, kps.ci_high) == (pytest.approx(lo), pytest.approx(hi))
    assert kps.p == pytest.approx(wilcoxon(d.numpy()).pvalue)  # exact: ranks 3, 2, 1, 4, one negative -> 0.25
    assert gt.n == 1 and gt.difference == pytest.approx(0.4) and gt.p == pytest.approx(wilcoxon([0.4]).pvalue)
    assert [c.p_holm for c in out] == pytest.approx(M.holm([kps.p, gt.p]))
    text = render(out)
    assert text.startswith("| metric | cat | lora | Δ (cat − lora) [95% CI] | pairs | p | p_holm |")
    assert "| kps | 0.753 | 0.713 | +0.040 [" in text and "Holm-corrected over the 2 metrics" in text
    assert render(out, "csv").splitlines()[0].startswith("metric,method,reference,n,")


def test_default_metrics_are_those_with_pairs():
    assert [c.metric for c in compare(CAT + LORA, "cat", "lora", resamples=50)] == ["kps", "gt_diversity_ratio"]


@pytest.mark.parametrize("args, message", [
    (("dreambooth", "lora", ("kps",)), "--method 'dreambooth' is not among the methods of these runs: cat, lora"),
    (("cat", "cat", ("kps",)), "both 'cat'"),
    (("cat", "lora", ("kpss",)), "--metric 'kpss' is not a metric"),
    (("cat", "lora", ("dino",)), "--metric dino: no subject and training seed"),
])
def test_bad_requests_are_refused(args, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compare(CAT + LORA, *args)


def test_undefined_values_are_left_out_of_the_pairs():
    nan = [run("cat", 0, {"a": {"kps": math.nan}, "b": {"kps": 0.5}}), run("lora", 0, {"a": {"kps": 0.4},
                                                                                       "b": {"kps": 0.4}})]
    assert pairs(nan, "cat", "lora", "kps") == [("b", 0, 0.5, 0.4)]
