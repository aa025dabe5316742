"""Metric math against hand-computed values on small embedding tensors."""

import math

import pytest
import torch

from kps_bench import metrics as M
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


def _records_and_embeddings():
    """One subject, two references, one prompt with two seeds; every cosine is known by construction."""
    e = {n: unit(*v) for n, v in {
        "x": (1, 0, 0), "y": (0, 1, 0), "z": (0, 0, 1), "xy": (1, 1, 0), "xz": (1, 0, 1)}.items()}
    recs, emb = [], {}

    def add(id_, role, clip, dino, trig=False, seed=None):
        recs.append(ImageRecord(id=id_, path=f"{id_}.png", role=role, subject="s",
                                prompt=None if role == "reference" else ("a sks cat" if trig else "a cat"),
                                prompt_without_trigger=None if role == "reference" else "a cat",
                                has_trigger=trig, seed=seed, prompt_index=None if role == "reference" else 0))
        emb[f"clip/{id_}"], emb[f"dino/{id_}"] = e[clip], e[dino]

    add("r1", "reference", "x", "x")
    add("r2", "reference", "y", "y")
    add("t1", "adapter", "x", "x", trig=True, seed=1)   # clip cos with refs: 1, 0
    add("t2", "adapter", "xy", "z", trig=True, seed=2)  # clip cos with refs: R2, R2 ; dino: 0, 0
    add("b1", "base", "x", "x", seed=1)
    add("b2", "base", "y", "y", seed=2)
    add("a1", "adapter", "x", "x", seed=1)    # paired with b1: cos 1
    add("a2", "adapter", "xz", "x", seed=2)   # paired with b2: cos 0 ; adapter dino set collapsed
    emb["clip_text/s/0"] = e["xz"]            # cos(t1)=R2, cos(t2)=0.5
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
