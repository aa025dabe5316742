"""No evaluation leakage (issue 15 §1): training captions are not evaluation prompts, and DreamBooth's class images
use neither the evaluation prompts nor the evaluation seeds."""

import json

import pytest
import yaml
from click.testing import CliRunner

from kps_bench.cli import main
from kps_bench.errors import UserError
from kps_bench.generate import Plan
from kps_bench.protocol import class_image_seed, derive_seed, expand_prompt, load_protocol
from kps_bench.train import load_recipe, train
from kps_bench.train.output import TRAINING_JSON, partial_dir
from kps_bench.train.recipe import METHODS, recipe_file_layers, training_prompts

FAST = ["steps=2", "resolution=32", "checkpoint_every=1", "gradient_checkpointing=false"]
SHIPPED = ("shapes-world", "dreambench", "dreambench-quick")


def evaluation_prompts(protocol, subject) -> set[str]:
    """The prompts ``run`` generates for ``subject``: each template with and without the trigger."""
    return {expand_prompt(t, subject, trigger) for t in protocol.prompts_for(subject) for trigger in (True, False)}


# ----------------------------------------------------------------------------- captions


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_protocols_train_on_no_evaluation_prompt(name):
    p = load_protocol(name)
    assert not p.allow_prompt_overlap and "allow_prompt_overlap" not in p.to_dict()
    for method in METHODS:
        recipe, _ = load_recipe(method, p)
        for s in p.subjects:
            assert not set(training_prompts(p, s, recipe)) & evaluation_prompts(p, s), (method, s.name)
    s = p.subjects[0]
    trained = sorted(training_prompts(p, s, load_recipe("dreambooth", p)[0]))
    if name == "shapes-world":
        assert trained == ["a circle", "a sks circle"]  # the caption with and without the trigger; the class prompt
    else:
        assert trained == ["a backpack", "a photo of a backpack", "a photo of a sks backpack"]


@pytest.mark.parametrize("changes, message", [
    # no captions: the evaluation prompts are the default captions
    ({"training": {}}, "the cat training prompt 'a photo of a {subject}' (from the protocol's prompts, which an empty 'captions' "
         "({lora}) trains on) equals the evaluation prompt 'a photo of a {subject}' (field 'prompts.0') for subject "
         "'red-block': both give 'a photo of a sks block' (7 more overlaps like it)"),
    # equal after {subject} and {class_noun} are filled in, as generation fills them in
    ({"training": {"defaults": {"captions": ["a {subject} next to a {class_noun}"]}},
      "prompts": ["a {subject} on a table", "a {subject} next to a block"]},
     "the cat training prompt 'a {subject} next to a {class_noun}' (from field 'captions', set by protocol 'tiny' "
     "training.defaults) equals the evaluation prompt 'a {subject} next to a block' (field 'prompts.1') for subject "
     "'red-block': both give 'a sks block next to a block'"),
    # DreamBooth's class prompt "a {class_noun}" is the trigger-free twin of the evaluation prompt "a {subject}"
    ({"training": {"defaults": {"captions": ["a photo of a {subject}"]}}, "prompts": ["a {subject} on a table", "a {subject}"]},
     "the dreambooth training prompt 'a {class_noun}' (from field 'class_prompt' of the dreambooth recipe) equals the "
     "evaluation prompt 'a {subject}' (field 'prompts.1') for subject 'red-block': both give 'a block' (1 more overlap "
     "like it)"),
    # a subject's own prompt set
    ({"training": {"defaults": {"captions": ["a {subject} in the snow"]}}, "prompts": ["a {subject} on a table"],
      "prompt_sets": {"live": ["a red {subject}", "a {subject} in the snow"]}},
     "the cat training prompt 'a {subject} in the snow' (from field 'captions', set by protocol 'tiny' "
     "training.defaults) equals the evaluation prompt 'a {subject} in the snow' (field 'prompt_sets.live.1') for "
     "subject 'blue-ball': both give 'a zwx ball in the snow' (1 more overlap like it)"),
])
def test_validate_and_training_refuse_captions_that_are_evaluation_prompts(tiny, tmp_path, protocol_copy, changes,
                                                                         message):
    d = dict(changes)
    if "prompt_sets" in d:
        d["subjects"] = yaml.safe_load((tiny / "tiny.yaml").read_text())["subjects"]
        d["subjects"][1]["prompt_set"] = "live"
    path = protocol_copy(**d)
    lora = recipe_file_layers("lora")[0][0]
    expected = f"Error: {path}: " + message.replace("{lora}", lora)
    r = CliRunner().invoke(main, ["protocols", "validate", str(path)])
    assert r.exit_code == 2 and expected in r.output, r.output
    assert "Expected training captions disjoint from the evaluation prompts" in r.output
    assert "or set allow_prompt_overlap: true in the protocol to accept the overlap (recorded in provenance)" in r.output
    method = message.split("the ")[1].split(" training")[0]
    out = tmp_path / "adapter"
    r = CliRunner().invoke(main, ["train-baseline", method, "--protocol", str(path), "--subject", "red-block",
                                  "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 2 and expected in r.output, r.output
    assert not out.exists() and not partial_dir(out).exists()


def test_allow_prompt_overlap_is_accepted_and_recorded(tmp_path, protocol_copy):
    from kps_bench.run import RunOptions, run_benchmark

    path = protocol_copy(allow_prompt_overlap=True, training={})
    r = CliRunner().invoke(main, ["protocols", "validate", str(path)])
    assert r.exit_code == 0, r.output
    assert "training captions may equal evaluation prompts (allow_prompt_overlap)" in r.output
    p = load_protocol(str(path))
    assert p.to_dict()["allow_prompt_overlap"] is True
    assert load_protocol(str(path), ["allow_prompt_overlap=false"]).sha256 != p.sha256
    res = train("lora", p, "red-block", tmp_path / "lora", "cpu", FAST)
    t = json.loads((res.out / TRAINING_JSON).read_text())
    assert t["allow_prompt_overlap"] is True and t["captions"] == ["a photo of a sks block", "a sks block on a table"]
    results = run_benchmark(p, RunOptions(out=tmp_path / "run", adapter_kind="none", subjects=("red-block",),
                                          device="cpu"))
    assert results["provenance"]["protocol"]["allow_prompt_overlap"] is True


def test_allow_prompt_overlap_must_be_a_boolean(protocol_copy):
    path = protocol_copy(allow_prompt_overlap="yes")
    with pytest.raises(UserError) as e:
        load_protocol(str(path))
    assert str(e.value) == f"{path}: field 'allow_prompt_overlap' must be true or false, got 'yes' (str)."


# ----------------------------------------------------------------------------- DreamBooth's class images


@pytest.mark.parametrize("name", SHIPPED)
def test_class_image_seeds_are_disjoint_from_every_evaluation_seed(name):
    """Evaluation seeds are 63-bit hashes (< 2**63); class-image seeds have bit 63 set (>= 2**63), so the sets are
    disjoint for any recipe and protocol seed. Checked here on the seeds the shipped protocol's runs use."""
    p = load_protocol(name)
    g = p.generation
    evaluation = {j.seed for j in Plan(p, list(p.subjects), {"spec": "x"}, None, "cpu").jobs()}
    longest = max(len(p.prompts_for(s)) for s in p.subjects)
    assert evaluation == {derive_seed(g.seed, i, k) for i in range(longest) for k in range(g.images_per_prompt)}
    recipe, _ = load_recipe("dreambooth", p)
    for seed in {recipe.seed, g.seed, 0, 1, 2, 42}:  # the recipe's, the protocol's and replicate seeds
        cls = [class_image_seed(seed, k) for k in range(recipe.num_class_images)]
        assert len(set(cls)) == recipe.num_class_images and not set(cls) & evaluation
        assert max(evaluation) < 2**63 <= min(cls) and max(cls) < 2**64
    # the seeds class images used to have: with recipe seed 0 and protocol seed 0 (DreamBench) they were evaluation's
    old = {derive_seed(recipe.seed, k % len(p.prompts_for(p.subjects[0])), k) for k in range(recipe.num_class_images)}
    assert bool(old & evaluation) == (recipe.seed == g.seed)
