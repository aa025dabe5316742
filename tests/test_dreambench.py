"""The DreamBench protocols, named prompt sets end to end (run, leaderboard), and references under a root."""

import json

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from kps_bench.cli import main
from kps_bench.generate import Plan
from kps_bench.leaderboard import build_tables, load_run
from kps_bench.protocol import load_protocol
from kps_bench.run import RunOptions, run_benchmark

LIVE = {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A folder laid out like DreamBench's dataset/: one folder of (here two small generated) images per subject."""
    root = tmp_path_factory.mktemp("dreambench-dataset")
    rng = np.random.default_rng(0)
    for s in load_protocol("dreambench").subjects:
        (root / s.references).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / s.references / f"0{i}.jpg")
    return root


def test_dreambench_protocol_is_the_papers():
    p = load_protocol("dreambench")
    assert p.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (p.encoders.clip.arch, p.encoders.clip.weights, p.encoders.dino.model) == ("ViT-B-32", "openai",
                                                                                    "facebook/dino-vits16")
    assert p.generation.images_per_prompt == 4 and p.generation.resolution == 512
    assert len(p.subjects) == 30 and len({s.name for s in p.subjects}) == 30
    assert {s.name for s in p.subjects if s.prompt_set == "live"} == LIVE
    nouns = {s.name: s.class_noun for s in p.subjects}
    assert nouns["bear_plushie"] == "stuffed animal" and nouns["pink_sunglasses"] == "glasses"
    assert nouns["red_cartoon"] == "cartoon" and nouns["backpack_dog"] == "backpack"
    obj, live = p.prompt_sets["object"], p.prompt_sets["live"]
    assert len(obj) == len(live) == 25 and len(set(obj)) == len(set(live)) == 25
    assert obj[:10] == live[:10] and obj[20:] == live[20:]  # the dataset's lists share these
    assert obj[12] == "a {subject} with the Eiffel Tower in the background"
    assert live[13] == "a {subject} wearing a black top hat and a monocle"
    assert obj[24] == "a cube shaped {subject}"


def test_baselines_train_on_the_instance_prompt_not_the_evaluation_prompts():
    from kps_bench.train import load_recipe

    for name in ("dreambench", "dreambench-quick"):
        for method in ("lora", "dreambooth"):
            recipe, _ = load_recipe(method, load_protocol(name))
            assert recipe.captions == ("a photo of a {subject}",)


def test_quick_protocol_is_a_subset_of_dreambench():
    full, quick = load_protocol("dreambench"), load_protocol("dreambench-quick")
    assert len(quick.subjects) == 5 and quick.generation.images_per_prompt == 2
    assert {s.prompt_set for s in quick.subjects} == {"object", "live"}
    for s in quick.subjects:
        assert s == full.subject(s.name)
        assert len(quick.prompts_for(s)) == 5 and set(quick.prompts_for(s)) <= set(full.prompts_for(s))
    assert (quick.base_model, quick.encoders, quick.training) == (full.base_model, full.encoders, full.training)


@pytest.mark.parametrize("name, prompts", [("dreambench", 25), ("dreambench-quick", 5)])
def test_both_protocols_validate_against_a_dataset_folder(dataset, name, prompts):
    r = CliRunner().invoke(main, ["protocols", "validate", name], env={"DREAMBENCH_ROOT": str(dataset)})
    assert r.exit_code == 0, r.output
    assert f"{prompts} prompts per subject" in r.output
    p = load_protocol(name, [f"references_root={dataset}"])
    assert p.references_dir(p.subject("dog")) == dataset / "dog"


def test_missing_subject_folders_are_named(dataset, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for s in load_protocol("dreambench").subjects:
        if s.name not in ("dog3", "vase"):
            (partial / s.name).symlink_to(dataset / s.name)
    r = CliRunner().invoke(main, ["protocols", "validate", "dreambench"], env={"DREAMBENCH_ROOT": str(partial)})
    assert r.exit_code == 2
    assert f"2 of 30 subject folders do not exist under references_root '${{DREAMBENCH_ROOT}}' (resolved to '{partial}'): dog3, vase." in r.output
    # `run` says the same before it loads any model (the hub is not reachable here)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["run", "--protocol", "dreambench-quick", "--adapter-kind", "none", "--out", str(out),
                                  "--set", f"references_root={tmp_path / 'nowhere'}", "--device", "cpu"])
    assert r.exit_code == 2
    assert "5 of 5 subject folders do not exist" in r.output and "backpack, bear_plushie, robot_toy, cat, dog" in r.output
    assert "--set references_root=PATH" in r.output
    r = CliRunner().invoke(main, ["protocols", "validate", "dreambench"], env={"DREAMBENCH_ROOT": None})
    assert r.exit_code == 2 and "variable DREAMBENCH_ROOT, which is not set" in r.output


@pytest.fixture(scope="module")
def sets_protocol(tiny):
    """The tiny protocol with two prompt sets of different lengths: red-block takes 2 prompts, blue-ball 3."""
    d = yaml.safe_load((tiny / "tiny.yaml").read_text())
    d.pop("prompts")
    d["prompt_sets"] = {"object": ["a photo of a {subject}", "a {subject} on a table"],
                        "live": ["a {subject} in the snow", "a red {subject}", "a {subject} on the beach"]}
    d["subjects"][0]["prompt_set"], d["subjects"][1]["prompt_set"] = "object", "live"
    path = tiny / "sets.yaml"
    path.write_text(yaml.safe_dump(d))
    return load_protocol(str(path))


def test_jobs_follow_each_subjects_prompt_set(sets_protocol):
    jobs = list(Plan(sets_protocol, sets_protocol.subjects, {"spec": "x"}, None, "cpu").jobs())
    by_subject = {s: sorted({j.prompt_without_trigger for j in jobs if j.subject == s}) for s in ("red-block", "blue-ball")}
    assert by_subject == {"red-block": ["a block on a table", "a photo of a block"],
                          "blue-ball": ["a ball in the snow", "a ball on the beach", "a red ball"]}


@pytest.mark.slow
def test_leaderboard_takes_runs_whose_subjects_use_different_prompt_sets(tiny, sets_protocol, tmp_path):
    run_benchmark(sets_protocol, RunOptions(out=tmp_path / "base", adapter_kind="none", device="cpu"))
    for s in ("red-block", "blue-ball"):
        run_benchmark(sets_protocol, RunOptions(out=tmp_path / s, adapter=str(tiny / "lora"), subjects=(s,),
                                                label="lora", device="cpu"))
    runs = [load_run(tmp_path / d) for d in ("base", "red-block", "blue-ball")]
    assert runs[0].results["counts"]["base"] == (2 + 3) * 2 * 2  # images_per_prompt 2, trigger-free and trigger
    (table,) = build_tables(runs, reference="base", resamples=200)
    rows = {r["name"]: r for r in table.rows}
    per_run = [json.loads((tmp_path / s / "results.json").read_text())["metrics"][s]["kps"]["value"]
               for s in ("red-block", "blue-ball")]
    assert rows["lora"]["kps"]["value"] == pytest.approx(sum(per_run) / 2, abs=1e-12)
    assert rows["lora"]["n_pairs_kps"] == 2 + 3 and rows["lora"]["n_subjects"] == 2
