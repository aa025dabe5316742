"""Metric math against hand-computed values on small embedding tensors."""

import math

import pytest
import torch
from scipy.stats import spearmanr

from kps_bench import metrics as M
from kps_bench import registry as R
from kps_bench.evaluate import compute_results
from kps_bench.rundir import ImageRecord

R2 = 1 / math.sqrt(2)


def unit(*v):
    t = torch.tensor(v, dtype=torch.float32)
    return t / t.norm()


def test_cosine_matrix_hand_values():
    a = torch.stack([unit(1, 0), unit(0, 1)])
    b = torch.stack([unit(1, 0), unit(1, 1), unit(-1, 0)])
    expected = torch.tensor([[1.0, R2, -1.0], [0.0, R2, 0.0]], dtype=torch.float64)
    assert torch.allclose(M.cosine_matrix(a, b), expected, atol=1e-7)


def test_identical_embeddings_give_cosine_exactly_one():
    x = torch.randn(5, 16)
    x = x / x.norm(dim=-1, keepdim=True)
    assert torch.equal(M.paired_cosine(x, x.clone()), torch.ones(5, dtype=torch.float64))


def test_harmonic_mean_and_kps():
    assert M.harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    assert M.kps(1.0, 1.0) == 1.0
    assert M.kps(0.0, 0.0) == 0.0
    t = M.kps(torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.5]))
    assert torch.allclose(t, torch.tensor([0.6857142857142857, 0.5], dtype=torch.float64))


def test_diversity_excludes_the_diagonal():
    e = torch.stack([unit(1, 0), unit(0, 1), unit(1, 1)])
    # distinct pairs: (1,2): 1 - 0 = 1; (1,3) and (2,3): 1 - 1/sqrt(2)
    expected = (1 + 2 * (1 - R2)) / 3
    assert M.mean_pairwise_cosine_distance(e) == pytest.approx(expected, abs=1e-9)
    with_diagonal = (2 * (1 + 2 * (1 - R2))) / 9
    assert M.mean_pairwise_cosine_distance(e) != pytest.approx(with_diagonal, abs=1e-3)


def test_vendi_score_extremes():
    assert M.vendi_score(torch.eye(4)) == pytest.approx(4.0, abs=1e-9)
    same = unit(1, 2, 3).repeat(5, 1)
    assert M.vendi_score(same) == pytest.approx(1.0, abs=1e-6)
    # two orthogonal clusters of equal size: effective number 2
    two = torch.stack([unit(1, 0)] * 3 + [unit(0, 1)] * 3)
    assert M.vendi_score(two) == pytest.approx(2.0, abs=1e-6)


def test_bootstrap_weights_are_resamples():
    w = M.bootstrap_weights(5, 100, seed=3)
    assert w.shape == (100, 5)
    assert torch.all(w.sum(1) == 5)
    assert torch.equal(w, M.bootstrap_weights(5, 100, seed=3))
    assert not torch.equal(w, M.bootstrap_weights(5, 100, seed=4))


E = {n: unit(*v) for n, v in {"x": (1, 0, 0), "y": (0, 1, 0), "z": (0, 0, 1), "xy": (1, 1, 0), "xz": (1, 0, 1)}.items()}


def _adder(recs, emb):
    """``add(id, role, clip, dino, trig, seed)``: append an image of subject s, prompt 0, with embeddings from E."""

    def add(id_, role, clip, dino, trig=False, seed=None):
        recs.append(ImageRecord(id=id_, path=f"{id_}.png", role=role, subject="s",
                                prompt=None if role == "reference" else ("a sks cat" if trig else "a cat"),
                                prompt_without_trigger=None if role == "reference" else "a cat",
                                has_trigger=trig, seed=seed, prompt_index=None if role == "reference" else 0))
        emb[f"clip/{id_}"], emb[f"dino/{id_}"] = E[clip], E[dino]

    return add


def _records_and_embeddings():
    """One subject, two references, one prompt with two seeds; every cosine is known by construction."""
    recs, emb = [], {}
    add = _adder(recs, emb)
    add("r1", "reference", "x", "x")
    add("r2", "reference", "y", "y")
    add("t1", "adapter", "x", "x", trig=True, seed=1)   # clip cos with refs: 1, 0
    add("t2", "adapter", "xy", "z", trig=True, seed=2)  # clip cos with refs: R2, R2 ; dino: 0, 0
    add("b1", "base", "x", "x", seed=1)
    add("b2", "base", "y", "y", seed=2)
    add("a1", "adapter", "x", "x", seed=1)    # paired with b1: cos 1
    add("a2", "adapter", "xz", "x", seed=2)   # paired with b2: cos 0 ; adapter dino set collapsed
    emb["clip_text/s/0"] = E["xz"]            # cos(t1)=R2, cos(t2)=0.5
    return recs, emb


def test_compute_results_hand_values():
    recs, emb = _records_and_embeddings()
    res = compute_results(recs, emb, ["kps", "identity", "preservation", "clip_i", "clip_t", "dino", "diversity",
                                      "vendi"], resamples=50, seed=0)
    m = res["metrics"]["s"]
    clip_pairs = [1, 0, R2, R2]
    assert m["clip_i"]["value"] == pytest.approx(sum(clip_pairs) / 4)
    assert m["clip_i"]["n"] == 4  # 2 trigger images x 2 references
    identity = sum((1 + c) / 2 for c in clip_pairs) / 4
    assert m["identity"]["value"] == pytest.approx(identity)
    assert m["dino"]["value"] == pytest.approx((1 + 0 + 0 + 0) / 4)
    assert m["clip_t"]["value"] == pytest.approx((R2 + 0.5) / 2)
    preservation = ((1 + 1) / 2 + (1 + 0) / 2) / 2
    assert m["preservation"]["value"] == pytest.approx(preservation)
    assert m["preservation"]["n"] == 2
    assert m["kps"]["value"] == pytest.approx(2 * identity * preservation / (identity + preservation))
    assert m["diversity_base"]["value"] == pytest.approx(1.0)      # x vs y: 1 - 0
    assert m["diversity_adapter"]["value"] == pytest.approx(0.0)   # x vs x
    assert m["diversity_ratio"]["value"] == pytest.approx(0.0)
    assert m["vendi_base"]["value"] == pytest.approx(2.0)
    assert m["vendi_adapter"]["value"] == pytest.approx(1.0)
    assert res["overall"]["kps"]["value"] == pytest.approx(m["kps"]["value"])
    for entry in (m["kps"], m["identity"], m["preservation"]):  # one prompt: the bootstrap interval is a point
        assert entry["ci_low"] == pytest.approx(entry["value"]) == pytest.approx(entry["ci_high"])


def test_confidence_interval_over_several_prompts_has_width_and_contains_the_value():
    """Three prompts whose identity is 1, 0.5 and 0: the interval has width, inside [0, 1] and around the mean."""
    recs = [ImageRecord(id="r", path="r.png", role="reference", subject="s")]
    emb = {"clip/r": unit(1, 0, 0), "dino/r": unit(1, 0, 0)}
    for p, direction in enumerate([(1, 0, 0), (0, 1, 0), (-1, 0, 0)]):  # clip cos 1, 0, -1
        for role, trig in (("adapter", True), ("adapter", False), ("base", False)):
            i = f"{role}-{trig}-{p}"
            recs.append(ImageRecord(id=i, path=f"{i}.png", role=role, subject="s", prompt_without_trigger=f"p{p}",
                                    has_trigger=trig, seed=p, prompt_index=p))
            emb[f"clip/{i}"] = emb[f"dino/{i}"] = unit(*direction)
        emb[f"clip_text/s/{p}"] = unit(0, 0, 1)
    m = compute_results(recs, emb, ["identity"], resamples=2000, seed=0)["metrics"]["s"]["identity"]
    assert m["value"] == pytest.approx(0.5) and m["n"] == 3
    assert 0.0 <= m["ci_low"] < 0.5 - 0.1 and 0.5 + 0.1 < m["ci_high"] <= 1.0


def test_flagged_images_are_left_out_and_counted():
    recs, emb = _records_and_embeddings()
    next(r for r in recs if r.id == "t2").flags = ["black"]
    res = compute_results(recs, emb, ["clip_i"], resamples=10)
    assert res["metrics"]["s"]["clip_i"]["value"] == pytest.approx(0.5)  # only t1: (1 + 0) / 2
    assert res["counts"]["flagged"] == 1 and res["counts"]["flagged_ids"] == ["t2"]


def test_base_as_its_own_adapter_preserves_exactly():
    recs, emb = _records_and_embeddings()
    for r in recs:
        if r.role == "adapter" and not r.has_trigger:
            twin = "b" + r.id[1:]
            emb[f"clip/{r.id}"], emb[f"dino/{r.id}"] = emb[f"clip/{twin}"], emb[f"dino/{twin}"]
    m = compute_results(recs, emb, ["preservation", "diversity", "vendi"], resamples=10)["metrics"]["s"]
    assert m["preservation"]["value"] == 1.0
    assert m["diversity_ratio"]["value"] == 1.0
    assert m["vendi_ratio"]["value"] == 1.0


# ----------------------------------------------------------------------------- chance-corrected scores (issue 14)


def test_gain_and_kps_gain_hand_values():
    assert float(M.gain(0.7, 0.5, 0.9)) == pytest.approx(0.5)
    assert float(M.gain(0.5, 0.5, 0.9)) == 0.0 and float(M.gain(0.9, 0.5, 0.9)) == pytest.approx(1.0)
    assert math.isnan(float(M.gain(0.7, 0.5, 0.505))) and math.isnan(float(M.gain(0.7, 0.5, 0.5)))  # span <= 0.01
    assert math.isnan(float(M.gain(0.7, float("nan"), 0.9)))
    assert float(M.preservation_gain(0.75, 0.5)) == pytest.approx(0.5)
    assert float(M.kps_gain(0.0, 1.0)) == 0.0 and float(M.kps_gain(-0.3, 0.8)) == 0.0
    assert float(M.kps_gain(1.5, 0.5)) == pytest.approx(2 * 1 * 0.5 / 1.5)  # clipped to 1
    assert float(M.kps_gain(0.6, 0.3)) == pytest.approx(0.4)
    assert math.isnan(float(M.kps_gain(float("nan"), 0.5))) and float(M.kps_gain(0.0, float("nan"))) == 0.0
    assert torch.equal(M.off_diagonal(torch.tensor([[1, 2], [3, 4]])), torch.tensor([2, 3]))


def _gain_records(ref2="xy"):
    """References x and ``ref2``; adapter trigger images xz and y, base trigger images y and z (seeds 1, 2); base
    trigger-free x, y and adapter trigger-free x, xz (seeds 1, 2)."""
    recs, emb = [], {}
    add = _adder(recs, emb)
    add("r1", "reference", "x", "x")
    add("r2", "reference", ref2, ref2)
    add("t1", "adapter", "xz", "x", trig=True, seed=1)
    add("t2", "adapter", "y", "y", trig=True, seed=2)
    add("bt1", "base", "y", "y", trig=True, seed=1)
    add("bt2", "base", "z", "z", trig=True, seed=2)
    add("b1", "base", "x", "x", seed=1)
    add("b2", "base", "y", "y", seed=2)
    add("a1", "adapter", "x", "x", seed=1)
    add("a2", "adapter", "xz", "z", seed=2)
    emb["clip_text/s/0"] = E["x"]
    return recs, emb


def test_chance_corrected_scores_hand_values():
    recs, emb = _gain_records()
    res = compute_results(recs, emb, ["kps", "identity", "preservation"], resamples=20)
    m = res["metrics"]["s"]
    sim = lambda c: (1 + c) / 2  # noqa: E731
    ceiling = sim(R2)  # cos(x, xy), both orders
    identity = (sim(R2) + sim(0.5) + sim(0) + sim(R2)) / 4  # xz vs (x, xy); y vs (x, xy)
    identity_base = (sim(0) + sim(R2) + sim(0) + sim(0)) / 4  # y vs (x, xy); z vs (x, xy)
    identity_gain = (identity - identity_base) / (ceiling - identity_base)
    assert m["identity_ceiling"]["value"] == pytest.approx(ceiling) and m["identity_ceiling"]["n"] == 2
    assert m["identity"]["value"] == pytest.approx(identity)
    assert m["identity_base"]["value"] == pytest.approx(identity_base) and m["identity_base"]["n"] == 4
    assert m["identity_gain"]["value"] == pytest.approx(identity_gain) and 0 < identity_gain < 1
    preservation, floor = (sim(1) + sim(0)) / 2, sim(0)  # (x, x), (y, xz); base x vs y
    assert m["preservation"]["value"] == pytest.approx(preservation)
    assert m["preservation_floor"]["value"] == pytest.approx(floor) and m["preservation_floor"]["n"] == 2
    assert m["preservation_gain"]["value"] == pytest.approx((preservation - floor) / (1 - floor))
    assert m["kps_gain"]["value"] == pytest.approx(2 * identity_gain * 0.5 / (identity_gain + 0.5))
    for name in ("identity_base", "identity_ceiling", "identity_gain", "preservation_floor", "preservation_gain",
                 "kps_gain"):  # one prompt: every interval is a point
        assert m[name]["ci_low"] == pytest.approx(m[name]["value"]) == pytest.approx(m[name]["ci_high"])
    assert res["overall"]["kps_gain"]["value"] == pytest.approx(m["kps_gain"]["value"])
    assert res["warnings"] == []


def test_gain_is_nan_with_a_warning_naming_the_subject_when_the_ceiling_is_too_low():
    recs, emb = _gain_records(ref2="y")  # references x, y: ceiling 0.5, below identity_base
    res = compute_results(recs, emb, ["kps", "identity", "preservation"], resamples=20)
    m = res["metrics"]["s"]
    assert m["identity_ceiling"]["value"] == pytest.approx(0.5)
    assert math.isnan(m["identity_gain"]["value"]) and math.isnan(m["kps_gain"]["value"])
    assert m["preservation_gain"]["value"] == pytest.approx(0.5)
    (warning,) = res["warnings"]
    assert warning.startswith("identity_gain of subject 's' is undefined (NaN): identity_ceiling - identity_base = "
                              "-0.1250 <= 0.01")


def test_the_base_model_as_its_own_adapter_scores_zero_gain():
    recs, emb = _gain_records()
    for r in recs:  # every adapter image is the base model's image of the same prompt and seed
        if r.role == "adapter":
            twin = next(b for b in recs if b.role == "base" and b.has_trigger == r.has_trigger and b.seed == r.seed)
            emb[f"clip/{r.id}"], emb[f"dino/{r.id}"] = emb[f"clip/{twin.id}"], emb[f"dino/{twin.id}"]
    m = compute_results(recs, emb, ["kps", "identity", "preservation"], resamples=20)["metrics"]["s"]
    assert m["identity_gain"]["value"] == 0.0 and m["preservation_gain"]["value"] == 1.0
    assert m["kps_gain"]["value"] == 0.0


# ----------------------------------------------------------------------------- the metric engine's loose ends


def test_a_flagged_image_is_left_out_with_its_seed_partner_and_counted_per_metric():
    """Base trigger-free x, y, z and adapter x, x, y (seeds 1-3); the base image of seed 3 is flagged, so the adapter's
    image of seed 3 leaves the diversity, Vendi and preservation sets too."""
    recs, emb = [], {}
    add = _adder(recs, emb)
    add("r1", "reference", "x", "x")
    add("t1", "adapter", "x", "x", trig=True, seed=1)
    for seed, (b, a) in enumerate((("x", "x"), ("y", "x"), ("z", "y")), 1):
        add(f"b{seed}", "base", b, b, seed=seed)
        add(f"a{seed}", "adapter", a, a, seed=seed)
    emb["clip_text/s/0"] = E["x"]
    recs[-2].flags = ["black"]  # b3
    m = compute_results(recs, emb, ["kps", "identity", "preservation", "diversity", "vendi"], resamples=10)["metrics"]["s"]
    assert m["diversity_adapter"]["value"] == pytest.approx(0.0)  # x, x (y, the partner of the flagged z, is out)
    assert m["diversity_base"]["value"] == pytest.approx(1.0)     # x, y
    assert m["vendi_adapter"]["value"] == pytest.approx(1.0)
    assert m["preservation"]["value"] == pytest.approx((1 + 0.5) / 2) and m["preservation"]["n"] == 2
    assert m["preservation"]["flagged"] == 2 and m["diversity_adapter"]["flagged"] == 1
    assert m["diversity_ratio"]["flagged"] == 2 and m["identity"]["flagged"] == 0 and m["kps"]["flagged"] == 2


def test_null_or_repeated_seeds_are_refused_naming_the_rows():
    from kps_bench.errors import UserError

    recs, emb = _records_and_embeddings()
    next(r for r in recs if r.id == "b2").seed = 1
    next(r for r in recs if r.id == "a1").seed = None
    with pytest.raises(UserError) as e:
        compute_results(recs, emb, ["preservation"], resamples=10)
    assert "'a1' has no seed" in str(e.value)
    assert "seed 1 is repeated by 'b1', 'b2' (base, trigger-free prompt 0 of subject 's')" in str(e.value)


def test_counts_are_distinct_image_files():
    recs, emb = _records_and_embeddings()
    for r in recs:  # a base run: the adapter's trigger-free images are the base's files
        if r.role == "adapter" and not r.has_trigger:
            r.path = "b" + r.path[1:]
    counts = compute_results(recs, emb, ["kps"], resamples=10)["counts"]
    assert {k: counts[k] for k in ("reference", "base", "adapter", "generated")} == {
        "reference": 2, "base": 2, "adapter": 4, "generated": 4}


ENCODED = {"clip": ("clip/", "clip_text/"), "dino": ("dino/",)}


@pytest.mark.parametrize("subset", [tuple(m for i, m in enumerate(R.PROTOCOL_METRICS) if mask >> i & 1)
                                    for mask in range(1 << len(R.PROTOCOL_METRICS))], ids=lambda s: "+".join(s) or "none")
def test_every_metric_subset_computes_exactly_its_metrics_from_its_embeddings(subset):
    """Only the embeddings of the encoders a subset needs are given: the others must not be read. The values are
    those of the full computation."""
    recs, emb = _gain_records()
    full = compute_results(recs, emb, R.PROTOCOL_METRICS, resamples=10)["metrics"]["s"]
    need = R.encoders_needed(subset)
    given = {k: v for k, v in emb.items() if any(k.startswith(p) for e in need for p in ENCODED[e])}
    m = compute_results(recs, given, list(subset), resamples=10)["metrics"]["s"]
    expected = {x.name for x in R.METRICS.values() if x.enabled_by in subset}
    assert set(m) - {"n_prompts"} == expected
    for name in expected:
        assert m[name] == pytest.approx(full[name], nan_ok=True)


def test_the_registry_is_consistent():
    assert {m.enabled_by for m in R.METRICS.values() if not m.truth} == set(R.PROTOCOL_METRICS)
    for m in R.METRICS.values():
        assert all(i in R.METRICS for i in m.inputs) and bool(m.inputs) == bool(m.formula)
        assert (bool(m.encoders) or bool(m.inputs)) != bool(m.truth)
        assert not m.formula or callable(getattr(M, m.formula))
    assert R.encoders_needed(["kps", "identity", "preservation"]) == {"clip"}
    assert R.closure(["kps_gain"]) == ["kps_gain", "identity", "identity_base", "identity_ceiling", "identity_gain",
                                       "preservation", "preservation_floor", "preservation_gain"]


# ----------------------------------------------------------------------------- issue 15: leaderboard statistics


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


def test_holm_hand_values():
    # m = 4 defined p-values: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> running max 0.06
    adjusted = M.holm([0.01, 0.04, 0.03, 0.005, float("nan")])
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15) and math.isnan(adjusted[4])
    assert M.holm([0.6, 0.7]) == [1.0, 1.0]  # 0.6 x 2 is capped at 1, and the larger p cannot fall below it
    assert M.holm([]) == []


def test_pooled_sd_hand_values():
    # squared deviations 0.01 + 0 + 0.01 (df 2) and 0.01 + 0.01 (df 1); a single seed adds nothing
    assert M.pooled_sd([[0.7, 0.8, 0.9], [0.5, 0.7], [0.3]]) == pytest.approx(math.sqrt(0.04 / 3), abs=1e-12)
    assert M.pooled_sd([[0.7, float("nan"), 0.9]]) == pytest.approx(math.sqrt(0.02), abs=1e-12)
    assert math.isnan(M.pooled_sd([[0.3], [0.4]]))


def test_paired_differences_average_each_side_over_its_training_seeds():
    a = [f64([[0.6, 0.7], [0.8, 0.9]]), f64([[0.4, 0.6, 0.5]])]  # subject 1: 2 seeds x 2 prompts
    b = [f64([[0.5, 0.5]]), f64([[0.5, 0.5, 0.6]])]
    d = M.paired_differences(a, b)
    assert d.tolist() == pytest.approx([0.2, 0.3, -0.1, 0.1, -0.1], abs=1e-12)
    median, lo, hi = M.paired_median_difference(a, b, 500, seed=0, confidence=0.95)
    # a replicate's differences lie between -0.1 and 0.4 (subject 1 drawing its second seed twice: 0.9 - 0.5)
    assert median == pytest.approx(0.1, abs=1e-12) and -0.1 - 1e-12 <= lo <= median <= hi <= 0.4 + 1e-12
    # a prompt that a seed could not score counts with the seeds that did; one no seed scored is left out
    a = [f64([[float("nan"), 0.7, float("nan")], [0.8, 0.9, float("nan")]])]
    assert M.paired_differences(a, [f64([[0.5, 0.5, 0.5]])]).tolist() == pytest.approx([0.3, 0.3], abs=1e-12)
    # an even number of pairs: the mean of the two middle ones
    even = [f64([[0.1, 0.2, 0.3, 0.4]])], [torch.zeros(1, 4)]
    assert M.paired_median_difference(*even, 100, 0, 0.95)[0] == pytest.approx(0.25, abs=1e-12)
    assert all(math.isnan(x) for x in M.paired_median_difference([], [], 100, 0, 0.95))


def test_the_median_difference_interval_resamples_training_seeds():
    """One subject, one prompt, two seeds of 0 and 1 against 0: a replicate draws the seeds {0, 0}, {0, 1} or {1, 1}
    (probabilities 1/4, 1/2, 1/4), so its median difference is 0, 0.5 or 1."""
    a, b = [f64([[0.0], [1.0]])], [f64([[0.0]])]
    assert M.paired_median_difference(a, b, 4000, 0, 0.95) == (0.5, 0.0, 1.0)
    assert M.paired_median_difference(a, b, 4000, 0, 0.4) == (0.5, 0.5, 0.5)  # quantiles 0.3 and 0.7 fall on 0.5
    assert M.paired_median_difference([f64([[0.5]])], b, 4000, 0, 0.95) == (0.5, 0.5, 0.5)  # one seed


def test_mean_over_seeds_draws_each_subjects_seeds():
    from kps_bench.evaluate import mean_over_seeds

    one = torch.rand(1, 300, dtype=torch.float64)
    assert torch.equal(mean_over_seeds([one], 0)[0], one[0])  # one seed: the prompt resamples unchanged
    two = torch.cat([torch.zeros(1, 4000), torch.ones(1, 4000)]).to(torch.float64)
    out = mean_over_seeds([one[:, :1].expand(1, 4000), two], 0)
    assert out.shape == (2, 4000) and set(out[1].tolist()) == {0.0, 0.5, 1.0}
    assert [float((out[1] == v).double().mean()) for v in (0.0, 0.5, 1.0)] == pytest.approx([0.25, 0.5, 0.25],
                                                                                           abs=0.03)
    assert torch.equal(M.resampled_mean(two, 3), M.resampled_mean(two, 3))


def test_average_ranks_give_ties_their_mean_rank():
    assert M.average_ranks(torch.tensor([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]
    assert M.average_ranks(torch.tensor([[5.0, 5.0, 5.0]])).tolist() == [[2.0, 2.0, 2.0]]


def test_spearman_by_hand():
    # no ties: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert M.spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 3, 2, 4])).item() == pytest.approx(0.8)
    # ties: ranks [1, 2.5, 2.5, 4] and [1, 2, 3, 4]; centred products 4.5, squares 4.5 and 5
    assert M.spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 2, 3, 4])).item() == pytest.approx(
        4.5 / math.sqrt(4.5 * 5))
    assert M.spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])).item() == pytest.approx(-1.0)
    assert math.isnan(M.spearman(torch.tensor([1.0, 1, 1]), torch.tensor([1.0, 2, 3])).item())  # constant: undefined
    batched = M.spearman(torch.tensor([[1.0, 2, 3, 4], [1.0, 2, 2, 3]]), torch.tensor([[1.0, 3, 2, 4], [1.0, 2, 3, 4]]))
    assert batched.shape == (2,) and batched[0].item() == pytest.approx(0.8)


def test_spearman_matches_scipy_on_rows_with_ties():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 4, (20, 9), generator=g).double()
    y = torch.randint(0, 5, (20, 9), generator=g).double()
    ours = M.spearman(x, y)
    for i in range(20):
        theirs = spearmanr(x[i].numpy(), y[i].numpy()).statistic
        assert (math.isnan(theirs) and math.isnan(ours[i])) or ours[i].item() == pytest.approx(theirs, abs=1e-12)


def test_resample_indices_are_the_draws_of_resampled_mean():
    rows = torch.arange(12, dtype=torch.float64).reshape(3, 4)  # 3 units, 4 resamples
    idx = M.resample_indices(3, 4, seed=7)
    assert idx.shape == (4, 3) and torch.equal(idx, M.resample_indices(3, 4, seed=7))
    assert torch.equal(M.resampled_mean(rows, 7), rows.T.gather(1, idx).mean(1))
