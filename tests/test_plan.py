"""Planning flags: `run --dry-run` prints the plan and writes nothing; speed flags are recorded and keyed."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from kps_bench.cli import main
from kps_bench.models import SpeedFlags, load_pipeline
from kps_bench.plan import Calibration, RunPlan, plan_run, split_call
from kps_bench.protocol import load_protocol
from kps_bench.run import RunOptions, run_benchmark


def listing(folder):
    """Every path under ``folder``, with the files' modification times."""
    return {p: p.stat().st_mtime_ns if p.is_file() else None for p in folder.rglob("*")}


def test_dry_run_prints_the_plan_and_writes_nothing(tiny, tiny_protocol, tmp_path):
    cache = tmp_path / "cache"
    run_benchmark(load_protocol(str(tiny_protocol)), RunOptions(out=tmp_path / "lora", adapter=str(tiny / "lora"),
                                                                subjects=("red-block",), device="cpu", cache_dir=cache))
    before = listing(tmp_path)
    r = CliRunner().invoke(main, ["run", "--protocol", str(tiny_protocol), "--adapter", str(tiny / "textual-inversion"),
                                  "--subject", "red-block", "--out", str(tmp_path / "ti"), "--device", "cpu",
                                  "--cache-dir", str(cache), "--dry-run"])
    assert r.exit_code == 0, r.output
    # the lora run left the 8 base images (trigger-free and trigger prompts) in the cache; textual inversion's 8
    # adapter images are new; 4 references + 16 generated images per encoder, 2 trigger-free prompts for CLIP's text
    # encoder
    for line in ("base images: 0 to generate, 8 already made (run folder or image cache)",
                 "adapter images: 8 to generate, 0 already made", "clip encoder: 20 images", "dino encoder: 20 images",
                 "clip text encoder: 2 prompts", "estimated time: "):
        assert line in r.output
    assert listing(tmp_path) == before and not (tmp_path / "ti").exists()


def test_the_tiny_pipeline_has_stable_diffusions_latent_grid(tiny):
    # an eighth of the image size, as SD's VAE: the UNet's tokens, and so a plan's calibration, grow with the
    # resolution as a real model's do (a 2x VAE made a 512 px calibration 64x the attention of SD's)
    pipe = load_pipeline("pipeline", str(tiny / "pipeline"), "cpu", "float32", "ddim").pipe
    assert pipe.vae_scale_factor == 8
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)


def test_a_call_is_split_into_its_fixed_cost_and_its_steps_even_when_timing_noise_inverts_them():
    assert split_call(1.0, 1.4) == pytest.approx((0.6, 0.2))
    assert split_call(1.0, 1.0) == (0.0, 0.25)  # no measurable step cost: all of the 4-step call counts as steps
    assert split_call(1.0, 0.9) == (0.0, 0.225)  # the 4-step call came out faster (a busy machine)
    assert split_call(0.2, 1.0) == (0.0, 0.4)  # never a negative fixed cost


def test_the_estimate_is_the_calibration_times_the_work(tiny, tiny_protocol, tmp_path):
    protocol = load_protocol(str(tiny_protocol), ["generation.steps=6", "generation.batch_size=3"])
    plan = plan_run(protocol, RunOptions(out=tmp_path / "run", adapter=str(tiny / "lora"), subjects=("blue-ball",),
                                         device="cpu", cache_dir=tmp_path / "cache"))
    assert plan.new == {"base": 8, "adapter": 8} and plan.reused == {"base": 0, "adapter": 0}
    c = plan.calibration
    assert c.batch == 3 and c.call_s >= 0 and c.step_s > 0 and set(c.encode_s) == {"clip", "dino"}
    assert all(s > 0 for s in c.encode_s.values())
    calls = math.ceil(8 / 3) + math.ceil(8 / 3)  # 3 base and 3 adapter calls of up to 3 images
    assert math.isclose(plan.generate_s, calls * (c.call_s + 6 * c.step_s))
    assert math.isclose(plan.encode_s, 20 * (c.encode_s["clip"] + c.encode_s["dino"]))
    assert list(tmp_path.iterdir()) == []


def test_speed_flags_are_recorded_and_keep_their_images_apart(tiny, tiny_protocol, tmp_path):
    protocol = load_protocol(str(tiny_protocol), ["prompts=['a {subject}']"])
    plain = run_benchmark(protocol, RunOptions(out=tmp_path / "plain", adapter_kind="none", subjects=("red-block",),
                                               device="cpu", cache_dir=tmp_path / "cache"))
    fast = run_benchmark(protocol, RunOptions(out=tmp_path / "fast", adapter_kind="none", subjects=("red-block",),
                                              device="cpu", cache_dir=tmp_path / "cache",
                                              speed=SpeedFlags(channels_last=True, tf32=True)))
    assert plain["provenance"]["speed"] == {"compile": False, "channels_last": False, "tf32": False}
    assert fast["provenance"]["speed"] == {"compile": False, "channels_last": True, "tf32": True}
    # other cache keys: nothing is taken from the plain run's images, whose pixels the flags might move
    assert fast["provenance"]["images_made"] == {"base": 4} and fast["provenance"]["images_from_cache"] == {"base": 0}
    rows = {name: {(r["seed"], r["prompt"]): r["path"] for line in (tmp_path / name / "images.jsonl").read_text()
                   .splitlines() if (r := json.loads(line))["role"] == "base"} for name in ("plain", "fast")}
    assert rows["plain"].keys() == rows["fast"].keys() and set(rows["plain"].values()).isdisjoint(rows["fast"].values())
    for k, path in rows["plain"].items():
        a = np.asarray(Image.open(tmp_path / "plain" / path), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "fast" / rows["fast"][k]), dtype=np.int16)
        assert np.abs(a - b).max() <= 1  # on a CPU, the same images


def test_the_estimate_shares_the_batches_among_the_processes():
    """Under a launcher the ranks are dealt the generation batches in turn: the estimate is the busiest rank's calls
    (3 base and 3 adapter calls of up to 3 images: 2 + 2 on rank 0 of 2), and its share of the encoding."""
    c = Calibration(batch=3, call_s=0.5, step_s=0.25, encode_s={"clip": 0.01, "dino": 0.03})
    one = RunPlan({"base": 8, "adapter": 8}, {"base": 0, "adapter": 0}, {"clip": 20, "dino": 20}, 2, 6, c)
    two = dataclasses.replace(one, world=2)
    assert math.isclose(one.generate_s, 6 * (0.5 + 6 * 0.25)) and math.isclose(two.generate_s, 4 * (0.5 + 6 * 0.25))
    assert math.isclose(one.encode_s, 20 * 0.04) and math.isclose(two.encode_s, 10 * 0.04)
    assert "processes" not in one.text()
    assert ("processes: 2, dealt the generation and encoder batches in turn" in two.text()
            and "estimated time: 8.4 s (8.0 s generating, 0.4 s encoding" in two.text())
