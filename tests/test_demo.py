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
