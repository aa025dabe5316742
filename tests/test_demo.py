"""`kps-bench demo` end to end on the shapes world, reduced (one subject, two methods, few steps)."""

import json

import pytest
from PIL import Image

from kps_bench.demo import DemoOptions, run_demo


@pytest.mark.slow
def test_demo_reduced_end_to_end_and_cached(tmp_path):
    opts = DemoOptions(out=tmp_path, methods=("cat", "lora"), subjects=("purple-circle",),
                       train_overrides=("steps=4",), protocol_overrides=("prompts=['a {subject} on a white background', 'a small {subject}']",),
                       resamples=100)
    first = run_demo(opts)
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.tex", "grid.png", "plot.png"):
        assert (tmp_path / name).is_file()
    def cells(line):
        return [c.strip() for c in line.strip("| ").split("|")]

    by_subject = (tmp_path / "by-subject.md").read_text().splitlines()
    assert cells(by_subject[0]) == ["subject", "base", "cat", "lora"]
    assert [cells(l)[0] for l in by_subject[2:4]] == ["purple-circle", "mean over subjects"]
    claims = (tmp_path / "claims.md").read_text().splitlines()
    assert claims[0].startswith("| metric | cat | lora | Δ (cat − lora)")
    rows = {cells(l)[0]: cells(l) for l in claims[2:] if l.startswith("| ")}
    assert {"kps", "diversity_ratio", "gt_diversity_ratio"} <= rows.keys()
    assert all(r[4] == "1" for r in rows.values())  # one pair: one subject, one training seed
    lines = first.markdown.splitlines()
    assert lines[0].startswith("| rank | method | kps |")
    assert {l.split(" | ")[1] for l in lines[2:5]} == {"base", "cat", "lora"}
    assert "gt_identity" in lines[0]  # the shapes world's ground truth columns
    for f in ("grid.png", "plot.png"):
        with Image.open(tmp_path / f) as im:
            assert im.format == "PNG"
    training = json.loads((tmp_path / "adapters" / "cat" / "purple-circle" / "training.json").read_text())
    assert training["method"] == "cat" and training["subject"] == "purple-circle"
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("results.json")}
    second = run_demo(opts)  # every adapter and run is reused
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("results.json")} == stamps
    assert second.markdown == first.markdown


def _without_times(value):
    """A results.json or training.json without what changes from run to run: times, and paths under the folder."""
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items()
                if k not in {"start_time", "end_time", "duration_s", "timings_s", "image_cache", "path",
                             "train_log.csv"}}
    return value


@pytest.mark.slow
def test_demo_jobs_on_two_workers_make_the_files_of_a_sequential_demo(tiny_protocol, tmp_path):
    """`demo --jobs 2` on the CPU (tiny models, two methods): every adapter, image, embedding, leaderboard and figure
    has the bytes of the sequential demo's; results and trainings differ only in their times."""
    def demo(name, jobs):
        return run_demo(DemoOptions(out=tmp_path / name, protocol=str(tiny_protocol), subjects=("red-block",),
                                    methods=("lora", "textual-inversion"), device="cpu", jobs=jobs,
                                    cache_dir=tmp_path / f"cache-{name}", resamples=100,
                                    train_overrides=("steps=2", "resolution=32", "checkpoint_every=2",
                                                     "gradient_checkpointing=false")))

    one, two = demo("one", None), demo("two", 2)
    assert one.markdown == two.markdown
    a, b = one.out, two.out
    assert sorted(p.name for p in (b / "logs").iterdir()) == [
        "evaluate-base.log", "evaluate-lora-red-block.log", "evaluate-textual-inversion-red-block.log",
        "train-lora-red-block.log", "train-textual-inversion-red-block.log"]
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*")
                           if p.is_file() and p.relative_to(b).parts[0] != "logs")
    assert len([f for f in files if f.suffix == ".png"]) > 30
    for f in files:
        if f.name in ("results.json", "training.json"):
            assert _without_times(json.loads((a / f).read_text())) == _without_times(json.loads((b / f).read_text()))
        elif f.name == "train_log.csv":  # its last column is the elapsed time
            assert [l.rsplit(",", 1)[0] for l in (a / f).read_text().splitlines()] == \
                [l.rsplit(",", 1)[0] for l in (b / f).read_text().splitlines()]
        else:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_demo_training_seeds_are_replicates_of_one_row(tiny_protocol, tmp_path):
    """`demo --seed 0 --seed 1`: each (method, subject) trained once per seed into SUBJECT-seedN and run there; the
    leaderboard has one row per method over both seeds; a second demo reuses everything."""
    opts = DemoOptions(out=tmp_path / "out", protocol=str(tiny_protocol), subjects=("red-block",), methods=("lora",),
                       device="cpu", cache_dir=tmp_path / "cache", resamples=100, seeds=(0, 1),
                       train_overrides=("steps=2", "resolution=32", "checkpoint_every=2",
                                        "gradient_checkpointing=false"))
    first = run_demo(opts)
    out = tmp_path / "out"
    for seed in (0, 1):
        training = json.loads((out / "adapters" / "lora" / f"red-block-seed{seed}" / "training.json").read_text())
        assert training["seed"] == seed and training["subject"] == "red-block"
        assert (out / "runs" / "lora" / f"red-block-seed{seed}" / "results.json").is_file()
    assert not (out / "adapters" / "lora" / "red-block").exists()
    lines = first.markdown.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {r[1]: r for r in ([c.strip() for c in l.strip("|").split("|")] for l in lines[2:4])}
    assert set(rows) == {"base", "lora"} and rows["lora"][header.index("seeds")] == "2"
    assert float(rows["lora"][header.index("seed_sd(kps)")]) >= 0.0 and rows["base"][header.index("seed_sd(kps)")] == "—"
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    assert len(stamps) == 3
    assert run_demo(opts).markdown == first.markdown
    assert {p: p.stat().st_mtime_ns for p in out.rglob("results.json")} == stamps


def test_demo_refuses_an_adapter_of_another_recipe_and_redoes_a_failed_run(tiny_protocol, tmp_path):
    """A second demo with other recipe overrides must not reuse the first's adapter under the same folder; a run
    marked failed is run again, not taken as finished."""
    from kps_bench.errors import UserError

    def opts(steps):
        return DemoOptions(out=tmp_path / "out", protocol=str(tiny_protocol), subjects=("red-block",),
                           methods=("lora",), device="cpu", cache_dir=tmp_path / "cache", resamples=50,
                           train_overrides=(f"steps={steps}", "resolution=32", "checkpoint_every=2",
                                            "gradient_checkpointing=false"))

    run_demo(opts(2))
    adapter = tmp_path / "out" / "adapters" / "lora" / "red-block"
    with pytest.raises(UserError, match="recipe sha256") as e:
        run_demo(opts(3))
    assert str(adapter) in str(e.value) and "lora's recipe for red-block" in str(e.value)
    assert "Delete that folder" in str(e.value)
    results = tmp_path / "out" / "runs" / "lora" / "red-block" / "results.json"
    failed = json.loads(results.read_text())
    failed["status"] = "failed"
    results.write_text(json.dumps(failed))
    run_demo(opts(2))
    assert json.loads(results.read_text()).get("status") != "failed"
