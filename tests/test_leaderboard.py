"""Leaderboard numbers, intervals, significance, protocol mixing, output formats and figures."""

import csv
import io
import itertools
import json
import math
import statistics

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from kps_bench import metrics as M
from kps_bench.cli import main
from kps_bench.errors import UserError
from kps_bench.evaluate import SubjectStats
from kps_bench.figures import grid, plot
from kps_bench.leaderboard import Run, build_tables, load_run, paired_prompts, render, to_latex, wilcoxon
from kps_bench.protocol import load_protocol
from kps_bench.run import RunOptions, run_benchmark


@pytest.fixture(scope="module")
def runs(tiny, tiny_protocol, tmp_path_factory):
    root = tmp_path_factory.mktemp("board")
    p = load_protocol(str(tiny_protocol))
    run_benchmark(p, RunOptions(out=root / "base", adapter_kind="none", device="cpu"))
    for s in ("red-block", "blue-ball"):
        run_benchmark(p, RunOptions(out=root / f"lora-{s}", adapter=str(tiny / "lora"), subjects=(s,),
                                    label="lora", device="cpu"))
    return root


def dirs(root):
    return [root / "base", root / "lora-red-block", root / "lora-blue-ball"]


def test_values_equal_mean_of_run_results_and_cis_contain_them(runs):
    (table,) = build_tables([load_run(d) for d in dirs(runs)], reference="base", resamples=300)
    rows = {r["name"]: r for r in table.rows}
    assert set(rows) == {"base", "lora"}
    per_run = [json.loads((d / "results.json").read_text()) for d in dirs(runs)[1:]]
    for m in ("kps", "identity", "preservation", "clip_i", "clip_t", "dino", "diversity_ratio", "vendi_ratio"):
        expected = sum(r["metrics"][s][m]["value"] for r in per_run for s in r["metrics"]) / 2
        assert rows["lora"][m]["value"] == pytest.approx(expected, abs=1e-12)
        for r in rows.values():
            assert r[m]["ci_low"] - 1e-12 <= r[m]["value"] <= r[m]["ci_high"] + 1e-12
    assert rows["base"]["preservation"]["value"] == 1.0
    # distinct generated files: per (prompt, seed) the LoRA runs have 4 (base and adapter, trigger-free and trigger);
    # the base run 2, as its adapter images are the base's
    assert rows["lora"]["n_subjects"] == 2 and rows["lora"]["n_images"] == 2 * 2 * 2 * 4
    assert rows["base"]["n_images"] == 2 * 2 * 2 * 2 and rows["base"]["flagged"] == rows["lora"]["flagged"] == 0.0
    assert not rows["base"]["partial"] and not rows["lora"]["partial"]
    assert 0 < rows["lora"]["p_kps"] <= 1 and rows["lora"]["n_pairs_kps"] == 4  # 2 subjects x 2 prompts
    assert sorted(r["rank"] for r in table.rows) == [1, 2]


def _stats(identity):
    """Prompt statistics with the given per-prompt identity and preservation 1."""
    n = len(identity)
    ones = torch.ones(n, dtype=torch.float64)
    sums = {k: torch.zeros(n, dtype=torch.float64) for k in (
             "identity", "preservation", "clip_i", "clip_t", "dino", "diversity_base", "diversity_adapter",
             "vendi_base", "vendi_adapter")}
    counts = {k: ones.clone() for k in sums}
    sums["identity"] = torch.tensor(identity, dtype=torch.float64)
    sums["preservation"] = ones.clone()
    return SubjectStats([f"prompt {i}" for i in range(n)], sums, counts, ("kps",))


def test_wilcoxon_known_p_value():
    # six (subject, prompt) pairs, all in favour of A: exact two-sided p = 2 / 2**6
    a = Run(None, "a", {"metrics": {"s": {}}}, {"s": _stats([0.60, 0.62, 0.64, 0.66, 0.68, 0.70])})
    b = Run(None, "b", {"metrics": {"s": {}}}, {"s": _stats([0.50, 0.51, 0.52, 0.53, 0.54, 0.55])})
    diff = M.paired_differences(*paired_prompts([(a, "s")], [(b, "s")], "kps"))
    assert diff.numel() == 6 and wilcoxon(diff) == pytest.approx(0.03125)
    assert wilcoxon(M.paired_differences(*paired_prompts([(a, "s")], [(a, "s")], "kps"))) == 1.0
    # a second training seed of A, of lower identity on every prompt: each pair takes A's mean over its two seeds
    a2 = Run(None, "a", {"metrics": {"s": {}}}, {"s": _stats([0.40, 0.42, 0.44, 0.46, 0.48, 0.50])})
    a_kps, a2_kps, b_kps = ([2 * x / (x + 1) for x in v] for v in ([0.60, 0.62, 0.64, 0.66, 0.68, 0.70],
                                                                   [0.40, 0.42, 0.44, 0.46, 0.48, 0.50],
                                                                   [0.50, 0.51, 0.52, 0.53, 0.54, 0.55]))
    diff = M.paired_differences(*paired_prompts([(a, "s"), (a2, "s")], [(b, "s")], "kps"))
    assert diff.tolist() == pytest.approx([(x + y) / 2 - z for x, y, z in zip(a_kps, a2_kps, b_kps)], abs=1e-12)


def test_mixed_protocols_are_refused_unless_allowed(runs, tiny_protocol, tiny, tmp_path):
    p = load_protocol(str(tiny_protocol), ["generation.steps=3"])
    run_benchmark(p, RunOptions(out=tmp_path / "other", adapter_kind="none", subjects=("red-block",), device="cpu"))
    loaded = [load_run(d) for d in dirs(runs)] + [load_run(tmp_path / "other")]
    with pytest.raises(UserError, match="different protocols"):
        build_tables(loaded)
    tables = build_tables(loaded, allow_mixed=True, resamples=50)
    assert len(tables) == 2


def test_formats(runs):
    tables = build_tables([load_run(d) for d in dirs(runs)], reference="base", resamples=100)
    md = render(tables, "md")
    assert md.splitlines()[0].startswith("| rank | method | kps |") and "Protocol tiny v1.0" in md
    rows = list(csv.DictReader(io.StringIO(render(tables, "csv"))))
    assert {r["method"] for r in rows} == {"base", "lora"} and float(rows[0]["kps"]) > 0
    js = json.loads(render(tables, "json"))
    assert {(r["method"], r["metric"]) for r in js} >= {("lora", "kps"), ("base", "preservation")}
    tex = to_latex(tables[0])
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
    body = [l for l in tex.splitlines() if l.endswith(r"\\")]
    n_cols = len(tex.split("{tabular}{")[1].split("}")[0])
    assert all(l.count(" & ") == n_cols - 1 for l in body)
    assert r"clip\_i" in tex and "clip_i" not in tex.replace(r"clip\_i", "")
    assert r"\textbf{" in tex


def _cell(run_dir, image_id):
    """The image of ``image_id`` as the grid draws it: 96 x 96, nearest-neighbour upscaled."""
    import numpy as np

    row = next(json.loads(line) for line in (run_dir / "images.jsonl").read_text().splitlines()
               if json.loads(line)["id"] == image_id)
    with Image.open(run_dir / row["path"]) as im:
        return np.asarray(im.convert("RGB").resize((96, 96), Image.NEAREST))


def test_grid_and_plot_show_what_they_claim(runs, tmp_path):
    import numpy as np

    loaded = [load_run(d) for d in dirs(runs)]
    g = grid(loaded, tmp_path / "grid.png", prompts=2, seeds=2)
    with Image.open(g) as im:
        assert im.format == "PNG"
        # per subject: title + header + 3 rows (references, base, lora) of 96 px cells; 2 prompts x 2 seeds x 2 cells
        assert im.width == 150 + 8 * (96 + 4)
        assert im.height == 2 * (28 + 40 + 3 * (96 + 4)) + 2 * 4
        sheet = np.asarray(im.convert("RGB"))

    def at(row, col):  # the first section is subject blue-ball (sorted): rows references, base, lora
        y, x = 28 + 40 + row * 100, 150 + col * 100
        return sheet[y:y + 96, x:x + 96]

    refs = [json.loads(line)["id"] for line in (runs / "base" / "images.jsonl").read_text().splitlines()
            if json.loads(line)["role"] == "reference" and json.loads(line)["subject"] == "blue-ball"]
    assert np.array_equal(at(0, 0), _cell(runs / "base", refs[0]))
    assert np.array_equal(at(1, 0), _cell(runs / "base", "blue-ball:base:free:p0:k0"))
    assert np.array_equal(at(1, 1), _cell(runs / "base", "blue-ball:adapter:trigger:p0:k0"))
    lora = runs / "lora-blue-ball"
    assert np.array_equal(at(2, 0), _cell(lora, "blue-ball:adapter:free:p0:k0"))
    assert np.array_equal(at(2, 1), _cell(lora, "blue-ball:adapter:trigger:p0:k0"))
    assert np.array_equal(at(2, 7), _cell(lora, "blue-ball:adapter:trigger:p1:k1"))
    assert not np.array_equal(at(2, 0), at(1, 0))  # the LoRA's image is not the base's

    table = build_tables(loaded, resamples=50)[0]
    p = plot(table, tmp_path / "plot.png")
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size == (900, 750)
        before = np.asarray(im.convert("RGB"))
    lora_row = next(r for r in table.rows if r["name"] == "lora")
    for k in ("value", "ci_low", "ci_high"):
        lora_row["identity"][k] -= 0.2  # the point must move
    with Image.open(plot(table, tmp_path / "moved.png")) as im:
        assert not np.array_equal(np.asarray(im.convert("RGB")), before)


def test_a_run_with_no_scored_prompt_is_listed_unranked(runs, tmp_path):
    """Every base image flagged: no prompt has a preservation pair, so the leaderboard cannot bootstrap it."""
    import shutil

    run = tmp_path / "no-prompts"
    shutil.copytree(runs / "lora-red-block", run)
    res = json.loads((run / "results.json").read_text())
    lines = [json.loads(line) for line in (run / "images.jsonl").read_text().splitlines()]
    for r in lines:
        if r["role"] != "reference":
            r["flags"] = ["black"]
    (run / "images.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    res.pop("files")
    res["provenance"]["label"] = "all-flagged"
    for m in res["metrics"]["red-block"].values():
        if isinstance(m, dict):
            m.update(value=float("nan"), ci_low=float("nan"), ci_high=float("nan"))
    (run / "results.json").write_text(json.dumps(res))
    (table,) = build_tables([load_run(run), load_run(runs / "lora-blue-ball")], resamples=50, allow_partial=True)
    last = table.rows[-1]
    assert last["name"] == "all-flagged" and last["rank"] is None
    assert last["flagged"] == 1.0 and table.rows[0]["flagged"] == 0.0  # black images do not hide
    assert torch.tensor(last["kps"]["ci_low"]).isnan()


# ----------------------------------------------------------------------------- issue 14


def test_rows_over_different_subjects_are_refused_unless_allowed_and_then_marked(runs):
    loaded = [load_run(runs / "base"), load_run(runs / "lora-red-block")]
    with pytest.raises(UserError, match="The rows average over different subjects.*'lora' lacks blue-ball.*"
                                        "--allow-partial"):
        build_tables(loaded, resamples=50)
    (table,) = build_tables(loaded, resamples=50, allow_partial=True)
    rows = {r["name"]: r for r in table.rows}
    assert rows["lora"]["partial"] and not rows["base"]["partial"]
    md = render([table], "md")
    assert "| lora (partial) |" in md and "(partial): a mean over fewer subjects than the other rows'." in md
    assert {r["partial"] for r in csv.DictReader(io.StringIO(render([table], "csv")))} == {"True", "False"}
    args = ["leaderboard", str(runs / "base"), str(runs / "lora-red-block"), "--resamples", "20"]
    refused, allowed = CliRunner().invoke(main, args), CliRunner().invoke(main, args + ["--allow-partial"])
    assert refused.exit_code == 2 and "'lora' lacks blue-ball" in refused.output
    assert allowed.exit_code == 0 and "| lora (partial) |" in allowed.output


def test_json_rows_keep_their_own_image_counts(runs):
    (table,) = build_tables([load_run(d) for d in dirs(runs)], resamples=50)
    js = json.loads(render([table], "json"))
    assert {r["method"]: r["n_images"] for r in js} == {"base": 16, "lora": 32}
    assert {r["n_images_total"] for r in js} == {16 + 32} and {r["flagged"] for r in js} == {0.0}
    assert "48 generated image files in 3 runs" in render([table], "md")


def test_a_base_run_counts_distinct_image_files(runs):
    counts = json.loads((runs / "base" / "results.json").read_text())["counts"]
    # 2 subjects x 2 prompts x 2 seeds x (trigger-free, trigger): the adapter's images are the base's files
    assert counts["base"] == counts["adapter"] == counts["generated"] == 16 and counts["flagged"] == 0


def test_the_overall_interval_of_a_run_is_its_leaderboard_row_interval(runs):
    results = json.loads((runs / "base" / "results.json").read_text())
    b = results["provenance"]["protocol"]["bootstrap"]
    (table,) = build_tables([load_run(runs / "base")], resamples=b["resamples"], seed=b["seed"],
                            confidence=b["confidence"])
    (row,) = table.rows
    for m in ("kps", "identity", "preservation", "clip_i", "dino", "diversity_ratio"):
        overall = results["overall"][m]
        assert row[m]["value"] == pytest.approx(overall["value"], abs=1e-15)
        assert (row[m]["ci_low"], row[m]["ci_high"]) == (overall["ci_low"], overall["ci_high"])
    assert results["metrics"]["blue-ball"]["kps"]["ci_low"] != results["overall"]["kps"]["ci_low"]


# ----------------------------------------------------------------------------- issue 15: seeds and statistics


@pytest.fixture(scope="module")
def seeded(runs, tiny, tiny_protocol):
    """LoRA runs of two training seeds on both subjects (training.json records the seed; seed 1's weights are 40x
    seed 0's, so the runs differ), beside the base run: {(seed, subject): run dir}."""
    from safetensors.torch import load_file, save_file

    p = load_protocol(str(tiny_protocol))
    weights = load_file(tiny / "lora" / "pytorch_lora_weights.safetensors")
    out = {}
    for seed, scale in ((0, 1.0), (1, 40.0)):
        for s in ("red-block", "blue-ball"):
            adapter = runs / "adapters" / f"seed{seed}-{s}"
            adapter.mkdir(parents=True)
            save_file({k: v * scale for k, v in weights.items()}, adapter / "pytorch_lora_weights.safetensors")
            (adapter / "training.json").write_text(json.dumps({"method": "lora", "subject": s, "seed": seed,
                                                                "recipe_sha256": f"{seed + 1:x}" * 64}))
            out[seed, s] = runs / f"seed{seed}-{s}"
            run_benchmark(p, RunOptions(out=out[seed, s], adapter=str(adapter), device="cpu"))
    return out


def _value(run_dir, subject, metric):
    return json.loads((run_dir / "results.json").read_text())["metrics"][subject][metric]["value"]


def test_seed_replicates_average_over_seeds_within_subjects(runs, seeded):
    loaded = [load_run(runs / "base")] + [load_run(d) for d in seeded.values()]
    assert sorted(r.train_seed for r in loaded[1:]) == [0, 0, 1, 1] and loaded[0].train_seed is None
    (table,) = build_tables(loaded, reference="base", resamples=300)
    rows = {r["name"]: r for r in table.rows}
    lora = rows["lora"]
    assert lora["seeds"] == {"blue-ball": [0, 1], "red-block": [0, 1]} and rows["base"]["seeds"] == {
        "blue-ball": [None], "red-block": [None]}
    assert (lora["n_seeds"], lora["n_seeds_max"], lora["n_subjects"]) == (2, 2, 2)
    for m in ("kps", "identity", "preservation", "dino"):
        v = {(k, s): _value(d, s, m) for (k, s), d in seeded.items()}
        subject_means = {s: (v[0, s] + v[1, s]) / 2 for s in ("blue-ball", "red-block")}
        assert lora[m]["value"] == pytest.approx(sum(subject_means.values()) / 2, abs=1e-12)
        for s, mean in subject_means.items():
            assert lora[m]["by_subject"][s]["value"] == pytest.approx(mean, abs=1e-12)
        # two seeds per subject: each subject's variance is (a - b)^2 / 2 with 1 degree of freedom
        pooled = math.sqrt(sum((v[0, s] - v[1, s]) ** 2 / 2 for s in subject_means) / 2)
        assert lora[m]["seed_sd"] == pytest.approx(pooled, rel=1e-9) and lora[m]["seed_sd"] > 0
        assert lora[m]["ci_low"] - 1e-12 <= lora[m]["value"] <= lora[m]["ci_high"] + 1e-12
        assert math.isnan(rows["base"][m]["seed_sd"])
    assert lora["n_images"] == 4 * 2 * 2 * 2 * 2  # 4 runs x 2 prompts x 2 seeds x (base, adapter) x (free, trigger)
    md = render([table], "md")
    header = md.splitlines()[0].split(" | ")
    cells = dict(zip(header, next(l for l in md.splitlines() if "| lora |" in l).split(" | ")))
    assert cells["seeds"] == "2" and cells["seed_sd(kps)"] == f"{lora['kps']['seed_sd']:.3f}"
    assert "mean over subjects of each subject's mean over its training seeds" in md
    assert "subjects, then each drawn subject's training seeds, then each drawn seed's prompts" in md
    assert "recipes (sha256) base none recorded; lora 11111111, 22222222" in md
    csv_row = next(r for r in csv.DictReader(io.StringIO(render([table], "csv"))) if r["method"] == "lora")
    assert float(csv_row["kps_seed_sd"]) == pytest.approx(lora["kps"]["seed_sd"]) and csv_row["n_seeds"] == "2"


def test_the_nested_interval_of_one_seed_per_subject_is_the_runs_overall_interval(runs, seeded):
    """Seed resampling changes nothing with one seed: a single run's row keeps results.json's overall interval."""
    results = json.loads((seeded[1, "red-block"] / "results.json").read_text())
    b = results["provenance"]["protocol"]["bootstrap"]
    (table,) = build_tables([load_run(seeded[1, "red-block"])], resamples=b["resamples"], seed=b["seed"])
    for m in ("kps", "identity", "preservation"):
        o = results["overall"][m]
        assert (table.rows[0][m]["ci_low"], table.rows[0][m]["ci_high"]) == (o["ci_low"], o["ci_high"])


def test_two_runs_with_one_training_seed_are_refused_naming_both_folders(runs, seeded, tmp_path):
    import shutil

    again = tmp_path / "seed0-red-block-again"
    shutil.copytree(seeded[0, "red-block"], again)
    with pytest.raises(UserError, match=f"Runs '{seeded[0, 'red-block']}' and '{again}' both evaluate method 'lora' "
                                        f"on subject 'red-block', with training seeds 0 and 0"):
        build_tables([load_run(seeded[0, "red-block"]), load_run(again)])
    r = CliRunner().invoke(main, ["leaderboard", str(seeded[0, "red-block"]), str(again), "--resamples", "20"])
    assert r.exit_code == 2 and str(again) in r.output and "not seed replicates" in r.output
    # without a training.json the seed is unknown, so two runs of one subject cannot be told apart
    unknown = tmp_path / "lora-red-block-again"
    shutil.copytree(runs / "lora-red-block", unknown)
    with pytest.raises(UserError, match="with training seeds unknown and unknown, so they are not seed replicates"):
        build_tables([load_run(runs / "lora-red-block"), load_run(unknown)])


def test_holm_p_values_and_median_differences_against_the_reference(runs, seeded):
    from kps_bench.leaderboard import per_prompt

    loaded = [load_run(runs / "base")] + [load_run(d) for d in seeded.values()]
    (table,) = build_tables(loaded, reference="base", resamples=300)
    lora = next(r for r in table.rows if r["name"] == "lora")
    base = load_run(runs / "base")
    for m in ("kps", "preservation"):
        # each (subject, prompt): the mean over the two seeds minus the base's value; 2 subjects x 2 prompts
        diffs = []
        for s in ("blue-ball", "red-block"):
            seeds = [per_prompt(load_run(seeded[k, s]), s, m) for k in (0, 1)]
            diffs += [(seeds[0][p] + seeds[1][p]) / 2 - v for p, v in per_prompt(base, s, m).items()]
        assert lora[f"n_pairs_{m}"] == 4
        assert lora[f"diff_{m}"]["value"] == pytest.approx(statistics.median(diffs), abs=1e-12)
        d = lora[f"diff_{m}"]
        assert d["ci_low"] <= d["value"] <= d["ci_high"]
        # the exact two-sided Wilcoxon p of four pairs: the share of the 16 sign patterns whose rank sum is at most
        # the observed smaller one, doubled
        rank = {x: i + 1 for i, x in enumerate(sorted(abs(x) for x in diffs))}
        w_plus = sum(rank[abs(x)] for x in diffs if x > 0)
        sums = [sum(r for r, b in zip((1, 2, 3, 4), bits) if b) for bits in itertools.product((0, 1), repeat=4)]
        w = min(w_plus, 10 - w_plus)
        assert lora[f"p_{m}"] == pytest.approx(min(1.0, 2 * sum(x <= w for x in sums) / 16), abs=1e-12)
    # two tests (kps, preservation): the smaller p doubles, the larger is at least that
    small, large = sorted((lora["p_kps"], lora["p_preservation"]))
    expected = {small: min(1.0, 2 * small), large: max(min(1.0, 2 * small), large)}
    assert lora["p_holm_kps"] == expected[lora["p_kps"]] and lora["p_holm_preservation"] == expected[
        lora["p_preservation"]]
    md = render([table], "md")
    assert "| Δ(kps) | p_holm(kps) |" in md and "Holm-corrected over the 2 tests of this table (1 method x kps, " \
                                                "preservation)" in md
    assert "The test's unit is the prompt, nested in subjects: the pairs of one subject are not independent" in md
    assert "the paired differences, method minus base, over (subject, prompt) pairs: a pair is one subject and " \
           "prompt (the same evaluation seeds on both sides), each side's value averaged over its training seeds" in md


def test_latex_is_a_booktabs_table_with_intervals_and_a_caption_naming_the_setup(runs, seeded):
    import re

    loaded = [load_run(runs / "base")] + [load_run(d) for d in seeded.values()]
    (table,) = build_tables(loaded, reference="base", resamples=100)
    tex = to_latex(table)
    lines = tex.splitlines()
    assert lines[:5] == [r"\begin{table}[t]", r"\centering", r"\small", lines[3], r"\toprule"]
    assert lines[3].startswith(r"\begin{tabular}{rl") and lines[-1] == r"\end{table}"
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert lines.count(rule) == 1
    assert r"\pm" not in tex and r"\hline" not in tex
    lora = next(l for l in lines if l.startswith("2 & lora") or l.startswith("1 & lora"))
    kps = table.rows[[r["name"] for r in table.rows].index("lora")]["kps"]
    interval = f"{kps['value']:.3f} [{kps['ci_low']:.3f}, {kps['ci_high']:.3f}]"
    assert re.fullmatch(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", interval) and interval.split(" [")[1] in lora
    n_cols = len(lines[3].split("{tabular}{")[1].rstrip("}"))
    assert all(l.count(" & ") == n_cols - 1 for l in lines if l.endswith(r"\\"))
    caption = next(l for l in lines if l.startswith(r"\caption[kps-bench leaderboard, protocol tiny v1.0]{"))
    base_sha = loaded[0].provenance["base_model"]["sha256"][:12]
    for part in (f"Base model pipeline (local, sha256 {base_sha})", "ddim sampler, 2 steps, CFG 2.0, 32 px",
                 "2 prompts per subject, 2 images per prompt", "recipes (sha256) base none recorded; lora 11111111, "
                 "22222222", r"95\% CI", r"p\_holm"):
        assert part in caption
    assert re.search(r"^\\label\{tab:kps-bench-tiny-[0-9a-f]{8}\}$", tex, re.M)
    assert r"$\Delta$(kps) & p\_holm(kps)" in tex


def test_subject_by_method_table(runs, seeded, tmp_path):
    from kps_bench.leaderboard import MEAN_ROW, Pivot, render

    loaded = [load_run(runs / "base")] + [load_run(d) for d in seeded.values()]
    (pivot,) = build_tables(loaded, group_by="subject", resamples=200)
    (table,) = build_tables(loaded, resamples=200)
    assert isinstance(pivot, Pivot) and pivot.metric == "kps"
    f = pivot.frame
    assert list(f.index) == ["blue-ball", "red-block", MEAN_ROW]
    assert list(dict.fromkeys(f.columns.get_level_values(0))) == [r["name"] for r in table.rows]  # rank order
    for s in ("blue-ball", "red-block"):
        assert f.loc[s, ("lora", "value")] == pytest.approx(
            (_value(seeded[0, s], s, "kps") + _value(seeded[1, s], s, "kps")) / 2, abs=1e-12)
        assert f.loc[s, ("base", "value")] == pytest.approx(_value(runs / "base", s, "kps"), abs=1e-12)
        assert (f.loc[s, ("lora", "n_seeds")], f.loc[s, ("base", "n_seeds")]) == (2, 1)
        assert f.loc[s, ("lora", "ci_low")] <= f.loc[s, ("lora", "value")] + 1e-12
    for row in table.rows:  # the last row is the leaderboard's value and interval
        assert [f.loc[MEAN_ROW, (row["name"], k)] for k in ("value", "ci_low", "ci_high")] == [
            row["kps"][k] for k in ("value", "ci_low", "ci_high")]
    md = render([pivot], "md").splitlines()
    assert md[0] == "| subject | " + " | ".join(r["name"] for r in table.rows) + " |"
    assert md[4].startswith(f"| {MEAN_ROW} | ") and "Each cell is the subject's kps, mean over the method's" in md[6]
    tex = render([pivot], "tex")
    assert r"\begin{table}[t]" in tex and tex.count(r"\midrule") == 2 and r"\label{tab:kps-bench-tiny-" in tex
    assert "-subjects}" in tex and r"\caption[kps-bench kps per subject and method, protocol tiny v1.0]{" in tex
    out = tmp_path / "subjects.csv"
    r = CliRunner().invoke(main, ["leaderboard", *map(str, [runs / "base", *seeded.values()]), "--group-by",
                                  "subject", "--format", "csv", "--resamples", "200", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = {row["subject"]: row for row in csv.DictReader(io.StringIO(out.read_text()))}
    assert set(rows) == {"blue-ball", "red-block", MEAN_ROW} and rows["red-block"]["lora_n_seeds"] == "2"
    assert float(rows["red-block"]["lora"]) == pytest.approx(f.loc["red-block", ("lora", "value")])
    assert rows[MEAN_ROW]["lora_n_seeds"] == "" and rows["red-block"]["metric"] == "kps"
    js = json.loads(render([pivot], "json"))
    assert {(j["subject"], j["method"]): j["n_seeds"] for j in js}[("blue-ball", "lora")] == 2
