"""The equal-budget recipe search (`kps-bench tune`): its rule by hand, its search files' errors, and a reduced search
end to end on the development subjects of the shipped shapes world."""

import csv
import dataclasses
import json
import math

import pytest
import yaml

from kps_bench import registry
from kps_bench.protocol import load_protocol
from kps_bench.tune import choose, load_search
from kps_bench.validity import Adapter, recipe_hashes

from clitools import cli, expect_user_error


def write_search(tmp_path, variants, select="kps_gain", **extra):
    p = tmp_path / "search.yaml"
    p.write_text(yaml.safe_dump({"protocol": "shapes-world", "select": select, "variants": variants, **extra}))
    return p


def adapter(name, method, value):
    return Adapter(name, method, (), [], {}, {"kps_gain": value})


# ----------------------------------------------------------------------------- the rule


def test_choose_takes_each_methods_best_mean_and_keeps_the_earlier_on_a_tie():
    adapters = [adapter("lora-a", "lora", 0.2), adapter("lora-b", "lora", 0.5), adapter("lora-c", "lora", 0.5),
                adapter("ti-a", "textual-inversion", math.nan), adapter("ti-b", "textual-inversion", -0.1)]
    assert choose(adapters, "kps_gain") == {"lora": "lora-b", "textual-inversion": "ti-b"}
    assert choose([adapter("x", "lora", math.nan)], "kps_gain") == {}  # NaN never wins


def test_choose_follows_the_registrys_direction(monkeypatch):
    lower = dataclasses.replace(registry.METRICS["kps_gain"], higher_is_better=False)
    monkeypatch.setitem(registry.METRICS, "kps_gain", lower)
    adapters = [adapter("lora-a", "lora", 0.2), adapter("lora-b", "lora", 0.5)]
    assert choose(adapters, "kps_gain") == {"lora": "lora-a"}


# ----------------------------------------------------------------------------- search files


def test_the_shipped_search_gives_every_method_eight_distinct_configurations():
    search = load_search("shapes-world")
    assert search.select == "kps_gain" and search.methods == ["lora", "dreambooth", "textual-inversion", "cat"]
    assert all(sum(v.method == m for v in search.variants) == 8 for m in search.methods)
    protocol = load_protocol(search.protocol, search.protocol_overrides)
    assert len(set(recipe_hashes(search.file, search.variants, protocol).values())) == 32
    # cat searches its own parameter on lora's recipe, so that it stays lora plus its loss
    assert {v.overrides for v in search.variants if v.method == "cat"} == {
        (f"cat_weight={w}",) for w in ("0", "0.01", "0.03", "0.05", "0.1", "0.3", "1", "3")}


TWO_EACH = [{"name": "lora-2", "method": "lora", "set": {"steps": 2}},
            {"name": "lora-3", "method": "lora", "set": {"steps": 3}},
            {"name": "ti-2", "method": "textual-inversion", "set": {"steps": 2}},
            {"name": "ti-3", "method": "textual-inversion", "set": {"steps": 3}}]


def test_unequal_budgets_are_refused(tmp_path):
    p = write_search(tmp_path, TWO_EACH[:3])
    expect_user_error(cli("tune", "--search", p, "--out", tmp_path / "out"), str(p),
                      "different budgets (lora 2, textual-inversion 1 configurations)")


def test_a_select_that_is_not_a_leaderboard_metric_is_refused(tmp_path):
    for bad in ("gt_kps", "kps_gian", None):
        p = write_search(tmp_path, TWO_EACH, select=bad)
        expect_user_error(cli("tune", "--search", p, "--out", tmp_path / "out"), "field 'select'", "kps_gain")


def test_an_unknown_field_or_recipe_field_is_refused(tmp_path):
    p = write_search(tmp_path, TWO_EACH, subjects=["green-cross"])
    expect_user_error(cli("tune", "--search", p, "--out", tmp_path / "out"), "unknown field 'subjects'")
    p = write_search(tmp_path, [TWO_EACH[0], {"name": "x", "method": "lora", "set": {"stepz": 3}}])
    expect_user_error(cli("tune", "--search", p, "--out", tmp_path / "out"), "variants.1.set.stepz")


def test_evaluation_subjects_are_refused(tmp_path):
    p = write_search(tmp_path, TWO_EACH)
    subject = load_protocol("shapes-world").evaluation_subjects[0].name
    expect_user_error(cli("tune", "--search", p, "--out", tmp_path / "out", "--subject", subject),
                      f"Subject '{subject}'", "evaluation subject", "tuned on the test set", "green-cross")
    assert not (tmp_path / "out").exists()


def test_a_protocol_without_development_subjects_is_refused(tmp_path, tiny_protocol):
    p = write_search(tmp_path, TWO_EACH)
    data = yaml.safe_load(p.read_text())
    data["protocol"] = str(tiny_protocol)
    p.write_text(yaml.safe_dump(data))
    expect_user_error(cli("tune", "--search", p, "--out", tmp_path / "out"), "no development subjects",
                      "split: development")


# ----------------------------------------------------------------------------- end to end


def test_reduced_search_end_to_end_and_reused(tmp_path):
    """Two configurations each of LoRA and textual inversion (2 and 3 steps) on one development subject; 2 prompts x 2
    images, 4 sampling steps."""
    p = write_search(tmp_path, TWO_EACH,
                     protocol_overrides=["prompts=['a {subject} on a white background', 'a large {subject}']",
                                         "generation.images_per_prompt=2", "generation.steps=4"])
    out = tmp_path / "out"
    args = ["tune", "--search", p, "--out", out, "--subject", "green-cross", "--device", "cpu", "--cache-dir",
            tmp_path / "cache"]
    first = cli(*args)
    assert first.exit_code == 0, first.output
    record = json.loads((out / "tune.json").read_text())
    assert record["subjects"] == ["green-cross"] and record["search"]["select"] == "kps_gain"
    values = {a["name"]: a["values"]["kps_gain"] for a in record["adapters"]}
    assert set(values) == {"lora-2", "lora-3", "ti-2", "ti-3"}
    for method, names in (("lora", ("lora-2", "lora-3")), ("textual-inversion", ("ti-2", "ti-3"))):
        assert record["chosen"][method] == max(names, key=lambda n: (values[n], -names.index(n)))
    for a in record["adapters"]:  # each value is the run's own
        run = json.loads((out / "runs" / a["name"] / "green-cross" / "results.json").read_text())
        assert a["values"]["kps_gain"] == run["metrics"]["green-cross"]["kps_gain"]["value"]
        assert a["values"]["gt_kps"] >= 0.0  # the shapes world's truth is shown beside it
    rows = list(csv.DictReader((out / "tune.csv").open()))
    assert [r["configuration"] for r in rows] == ["lora-2", "lora-3", "ti-2", "ti-3"]
    assert [r["chosen"] for r in rows].count("True") == 2
    md = (out / "tune.md").read_text()
    assert "the highest mean `kps_gain`" in md and "| kps_gain green-cross |" in md and md in first.output
    stamps = {q: q.stat().st_mtime_ns for q in out.rglob("*") if q.name in ("results.json", "training.json")}
    assert len(stamps) == 8  # 4 trainings, 4 runs
    second = cli(*args)  # every adapter and run is reused
    assert second.exit_code == 0, second.output
    assert {q: q.stat().st_mtime_ns for q in stamps} == stamps
    assert json.loads((out / "tune.json").read_text())["chosen"] == record["chosen"]
