"""The metric-validity study (`kps-bench validate`): its statistics by hand, its study files' errors, and a reduced
study end to end on the shipped shapes world."""

import csv
import json
import math

import pytest
import torch
import yaml
from PIL import Image
from scipy.stats import spearmanr

from kps_bench import metrics as M
from kps_bench.protocol import load_protocol
from kps_bench.validity import (PRIMARY_TARGET, Adapter, Correlation, analyse, correlate, primary_score,
                                rho_difference, truth_values)

from clitools import cli, expect_user_error


# ----------------------------------------------------------------------------- statistics


def test_correlate_leaves_out_undefined_adapters_and_bootstraps_over_the_rest():
    x, y = [1.0, 2.0, 3.0, math.nan], [1.0, 3.0, 2.0, 5.0]
    rho, lo, hi, n = correlate(x, y, resamples=200, seed=1, confidence=0.9)
    assert n == 3 and rho == pytest.approx(0.5)  # ranks [1,2,3] and [1,3,2]: 1 - 6 * 2 / 24
    idx = M.resample_indices(3, 200, 1)
    xs, ys = torch.tensor(x[:3])[idx], torch.tensor(y[:3])[idx]
    with pytest.warns(Warning):  # scipy says so of the draws of one adapter three times
        samples = torch.tensor([spearmanr(a.numpy(), b.numpy()).statistic for a, b in zip(xs, ys)],
                               dtype=torch.float64)
    samples = samples[~torch.isnan(samples)]  # such a draw ranks nothing
    assert (lo, hi) == pytest.approx(tuple(torch.quantile(samples, torch.tensor([0.05, 0.95],
                                                                                dtype=torch.float64)).tolist()))
    assert correlate([1.0, math.nan], [1.0, 2.0], 10, 0, 0.95)[3] == 1


def test_rho_difference_is_paired():
    truth = [0.1, 0.5, 0.2, 0.9, 0.4]
    backwards = [-t for t in truth]
    d, lo, hi, n = rho_difference(backwards, truth, truth, resamples=300, seed=0, confidence=0.95)
    # every draw with two distinct adapters ranks them right on one side and wrong on the other: exactly 2
    assert (d, lo, hi, n) == (pytest.approx(2.0), pytest.approx(2.0), pytest.approx(2.0), 5)


def test_primary_score_decision_rule():
    assert primary_score({"kps": 0.4, "kps_gain": 0.9}) == "kps_gain"
    assert primary_score({"kps": 0.9, "kps_gain": 0.4}) == "kps"
    assert primary_score({"kps": 0.7, "kps_gain": 0.7}) == "kps"  # a tie keeps the paper's score
    assert primary_score({"kps": math.nan, "kps_gain": -0.2}) == "kps_gain"
    assert primary_score({"kps": 0.1, "kps_gain": math.nan}) == "kps"


def test_truth_values_by_hand():
    gt = truth_values({"true_identity": 0.5, "true_knowledge_shift": 0.2, "true_diversity_ratio": 0.9,
                       "trigger_shape_rate": None})
    assert gt["gt_identity"] == 0.5 and gt["gt_preservation"] == pytest.approx(0.8)
    assert gt["gt_kps"] == pytest.approx(2 * 0.5 * 0.8 / 1.3) and gt["gt_diversity_ratio"] == 0.9
    assert math.isnan(gt["gt_trigger_shape_rate"])
    assert math.isnan(truth_values({"true_identity": None, "true_knowledge_shift": 0.0})["gt_kps"])


def test_correlation_targets():
    c = Correlation("preservation", "gt_preservation", 0.73, 0.5, 0.9, 17, 0.8)
    assert c.met is False and c.shortfall == pytest.approx(0.07)
    assert Correlation("kps", "gt_kps", 0.85, 0.6, 0.95, 17, 0.8).shortfall == 0.0
    assert Correlation("dino", "gt_identity", 0.5, 0.1, 0.8, 17).met is None


def test_analyse_chooses_the_primary_column_and_gives_it_the_target():
    def adapter(name, kps, kps_gain, gt_kps):
        return Adapter(name, "lora", (), [], {}, {"kps": kps, "kps_gain": kps_gain, "gt_kps": gt_kps,
                                                  "preservation": gt_kps, "gt_preservation": gt_kps})

    adapters = [adapter("base", 0.87, 0.0, 0.03), adapter("a", 0.86, 0.4, 0.6), adapter("b", 0.90, 0.7, 0.8),
                adapter("c", 0.89, 0.2, 0.4)]
    corrs, decision = analyse(adapters, resamples=100, seed=0, confidence=0.95)
    by = {c.metric: c for c in corrs}
    assert [c.metric for c in corrs] == ["kps", "kps_gain", "preservation"]  # the pairs every adapter has
    assert by["kps_gain"].rho == pytest.approx(1.0) and by["kps"].rho == pytest.approx(0.4)  # d^2: 4, 1, 0, 1
    assert decision.primary == "kps_gain" and decision.difference == pytest.approx(0.6) and decision.n == 4
    assert by["kps_gain"].target == PRIMARY_TARGET and by["kps"].target is None
    assert by["preservation"].target == 0.8 and by["preservation"].met


# ----------------------------------------------------------------------------- study files


def write_study(tmp_path, variants, **top):
    study = {"protocol": "shapes-world", "variants": variants, **top}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


TWO = [{"name": "lora-short", "method": "lora", "set": {"steps": 2}},
       {"name": "ti-short", "method": "textual-inversion", "set": {"steps": 2}}]


def test_unknown_method_names_file_field_and_methods(tmp_path):
    p = write_study(tmp_path, [TWO[0], {"name": "x", "method": "hypernetwork"}])
    expect_user_error(cli("validate", "--study", p, "--out", tmp_path / "out"), str(p), "field 'variants.1.method'",
                      "'hypernetwork'", "cat, lora, dreambooth, textual-inversion")
    assert not (tmp_path / "out").exists()


def test_unknown_recipe_field_names_file_field_and_allowed_fields(tmp_path):
    p = write_study(tmp_path, [TWO[0], {"name": "x", "method": "lora", "set": {"stepz": 10}}])
    expect_user_error(cli("validate", "--study", p, "--out", tmp_path / "out"), str(p), "field 'variants.1.set.stepz'",
                      "not a recipe field of method 'lora'", "steps, batch_size")
    p = write_study(tmp_path, [TWO[0], {"name": "x", "method": "lora", "set": {"cat_weight": 3}}])
    expect_user_error(cli("validate", "--study", p, "--out", tmp_path / "out"), "variants.1.set.cat_weight")


def test_fewer_than_two_adapters_is_refused(tmp_path):
    p = write_study(tmp_path, [TWO[0]])
    expect_user_error(cli("validate", "--study", p, "--out", tmp_path / "out"), str(p), "field 'variants'",
                      "at least 2 adapters", "got 1 adapter(s)")


@pytest.mark.parametrize("variants, fragments", [
    ([TWO[0], {**TWO[1], "name": "lora-short"}], ["field 'variants.1.name'", "names two variants"]),
    ([TWO[0], {**TWO[1], "name": "base"}], ["field 'variants.1.name'", "other than 'base'"]),
    ([TWO[0], {**TWO[1], "colour": 1}], ["field 'variants.1.colour'", "expected: name, method, set"]),
    ([TWO[0], {**TWO[1], "set": [1]}], ["field 'variants.1.set' must be a mapping"]),
])
def test_bad_variants(tmp_path, variants, fragments):
    p = write_study(tmp_path, variants)
    expect_user_error(cli("validate", "--study", p, "--out", tmp_path / "out"), str(p), *fragments)


def test_bad_recipe_value_and_twin_recipes_are_refused_before_training(tmp_path):
    p = write_study(tmp_path, [TWO[0], {"name": "x", "method": "lora", "set": {"steps": 0}}])
    expect_user_error(cli("validate", "--study", p, "--out", tmp_path / "out"), str(p), "variants.1.set",
                      "variant 'x'", "'steps' must be an integer >= 1")
    p = write_study(tmp_path, [TWO[0], {"name": "same", "method": "lora", "set": {"steps": 2}}])
    expect_user_error(cli("validate", "--study", p, "--out", tmp_path / "out"), "variant 'same'",
                      "effective recipe of variant 'lora-short'")
    assert not (tmp_path / "out").exists()


def test_study_file_top_level_errors(tmp_path):
    p = write_study(tmp_path, TWO, colour="red")
    expect_user_error(cli("validate", "--study", p, "--out", tmp_path / "out"), "unknown field 'colour'",
                      "protocol, protocol_overrides, variants")
    p = write_study(tmp_path, TWO, protocol_overrides="generation.steps=2")
    expect_user_error(cli("validate", "--study", p, "--out", tmp_path / "out"), "protocol_overrides")
    expect_user_error(cli("validate", "--study", "nope", "--out", tmp_path / "out"), "Unknown validity study 'nope'",
                      "shapes-world")


def test_a_protocol_without_ground_truth_is_refused(tmp_path, tiny_protocol):
    p = write_study(tmp_path, TWO, protocol=str(tiny_protocol))
    expect_user_error(cli("validate", "--study", p, "--out", tmp_path / "out"), "is not a shapes world",
                      "ground truth")


def test_an_adapter_trained_with_another_recipe_or_base_model_is_not_reused(tmp_path):
    from kps_bench.models import model_identity
    from kps_bench.validity import load_study, recipe_hashes

    protocol = load_protocol("shapes-world")
    subject = protocol.evaluation_subjects[0].name
    p = write_study(tmp_path, TWO)
    folder = tmp_path / "out" / "adapters" / "lora-short" / subject
    folder.mkdir(parents=True)
    (folder / "training.json").write_text(json.dumps({"recipe_sha256": "0" * 64}))
    args = ["validate", "--study", p, "--out", tmp_path / "out", "--subject", subject]
    expect_user_error(cli(*args), str(folder), "recipe sha256 000000000000", "variant 'lora-short'",
                      "Delete that folder")
    study = load_study(str(p))
    recipe = recipe_hashes(study.file, study.variants, protocol)["lora-short"]
    (folder / "training.json").write_text(json.dumps({"recipe_sha256": recipe, "base_model": {"sha256": "1" * 64}}))
    base = model_identity(protocol.base_model, protocol.resolve(protocol.base_model, "pipeline"))["sha256"]
    expect_user_error(cli(*args), str(folder), "base model with sha256 111111111111", f"sha256 {base[:12]}")


def test_the_shipped_study_spans_what_the_issue_asks():
    from kps_bench.validity import load_study, recipe_hashes

    study = load_study("shapes-world")
    methods = {v.method for v in study.variants}
    assert methods == {"cat", "lora", "dreambooth", "textual-inversion"} and len(study.variants) >= 16
    cat = {v.overrides for v in study.variants if v.method == "cat"}
    assert {("cat_weight=0.0",), ("cat_weight=0.3",), ("cat_weight=1.0",), ("cat_weight=3.0",)} <= cat
    assert any("learning_rate" in o for v in study.variants for o in v.overrides)
    assert "generation.images_per_prompt=16" in study.protocol_overrides
    protocol = load_protocol(study.protocol, study.protocol_overrides)
    assert len(set(recipe_hashes(study.file, study.variants, protocol).values())) == len(study.variants)


# ----------------------------------------------------------------------------- end to end


def test_reduced_study_end_to_end_and_reused(tmp_path):
    """Two LoRAs on one evaluation subject, one trained 4 steps and one wrecked by 30 steps at a high learning rate;
    2 prompts x 3 images, 4 sampling steps."""
    subject = load_protocol("shapes-world").evaluation_subjects[0].name
    study = write_study(tmp_path, [{"name": "lora-4", "method": "lora", "set": {"steps": 4}},
                                   {"name": "lora-wreck", "method": "lora",
                                    "set": {"steps": 30, "learning_rate": 0.05}}],
                        protocol_overrides=["prompts=['a {subject} on a white background', 'a large {subject}']",
                                            "generation.images_per_prompt=3", "generation.steps=4"])
    out = tmp_path / "out"
    args = ["validate", "--study", study, "--out", out, "--subject", subject, "--device", "cpu", "--resamples", 200,
            "--cache-dir", tmp_path / "cache"]
    first = cli(*args)
    assert first.exit_code == 0, first.output
    record = json.loads((out / "validity.json").read_text())
    assert [a["name"] for a in record["adapters"]] == ["base", "lora-4", "lora-wreck"]
    base = record["adapters"][0]["values"]
    assert base["kps_gain"] == 0.0 and base["identity_gain"] == 0.0 and base["gt_preservation"] == 1.0
    assert record["protocol"]["images_per_prompt"] == 3 and record["subjects"] == [subject]
    assert [c["metric"] for c in record["correlations"]] == [
        "kps", "kps_gain", "identity", "identity_gain", "clip_i", "dino", "clip_t", "preservation",
        "preservation_gain", "diversity_ratio", "vendi_ratio"]
    wreck = record["adapters"][2]["values"]
    assert wreck["gt_preservation"] < 1.0 and wreck["preservation"] < base["preservation"]
    for c in record["correlations"]:  # each rho is that of the adapters' stored values
        x = torch.tensor([a["values"][c["metric"]] for a in record["adapters"]])
        y = torch.tensor([a["values"][c["truth"]] for a in record["adapters"]])
        want = M.spearman(x, y).item()
        assert (math.isnan(want) and math.isnan(c["rho"])) or c["rho"] == pytest.approx(want)
    by = {c["metric"]: c for c in record["correlations"]}
    assert by["preservation"]["n"] == 3 and by["preservation"]["ci_low"] <= by["preservation"]["rho"] <= 1.0
    d = record["decision"]
    assert d["primary"] == primary_score(d["rho"])
    assert set(record["diversity_sample"]["half_widths"]) == {f"lora-4/{subject}", f"lora-wreck/{subject}"}
    rows = list(csv.DictReader((out / "validity.csv").open()))
    assert [r["metric"] for r in rows] == [c["metric"] for c in record["correlations"]]
    assert len(list(csv.DictReader((out / "adapters.csv").open()))) == 3
    assert (out / "validity.md").read_text().startswith("| metric | ground truth | Spearman ρ [95% CI] |")
    summary = (out / "summary.md").read_text()
    assert "**Primary column.**" in summary and f"It is **`{d['primary']}`**" in summary
    assert summary in first.output
    with Image.open(out / "scatter.png") as im:
        assert im.format == "PNG"
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name in ("results.json", "training.json")}
    assert len(stamps) == 5  # 2 trainings, 3 runs
    second = cli(*args)  # every adapter and run is reused
    assert second.exit_code == 0, second.output
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = json.loads((out / "validity.json").read_text())
    assert again["correlations"] == record["correlations"] and again["adapters"] == record["adapters"]
