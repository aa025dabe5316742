"""Leaderboard numbers, intervals, significance, protocol mixing, output formats and figures."""

import csv
import io
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from kps_bench.cli import main
from kps_bench.errors import UserError
from kps_bench.evaluate import SubjectStats
from kps_bench.figures import grid, plot
from kps_bench.leaderboard import Run, build_tables, load_run, render, to_latex, wilcoxon_against
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
    p, n = wilcoxon_against([(a, "s")], [(b, "s")], "kps")
    assert n == 6 and p == pytest.approx(0.03125)
    p, n = wilcoxon_against([(a, "s")], [(a, "s")], "kps")
    assert p == 1.0


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
