"""Protocol loading, overrides, hashing and every validation error."""

import textwrap

import pytest
import yaml

from kps_bench.errors import UserError
from kps_bench.protocol import derive_seed, expand_prompt, load_protocol

GOOD = {
    "name": "t", "version": "1.0", "base_model": "some/model",
    "generation": {"steps": 10, "resolution": 64},
    "subjects": [{"name": "dog", "class_noun": "dog", "trigger": "sks", "references": "refs/dog"}],
    "prompts": ["a photo of a {subject}", "a {subject} next to a {class_noun}"],
}


def write(tmp_path, data, name="p.yaml"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def test_load_defaults_and_expansion(tmp_path):
    p = load_protocol(str(write(tmp_path, GOOD)))
    assert p.generation.steps == 10 and p.generation.guidance_scale == 7.5
    assert p.metrics == ("kps", "identity", "preservation", "clip_i", "clip_t", "dino", "diversity", "vendi")
    s = p.subjects[0]
    assert expand_prompt(p.prompts[1], s, True) == "a sks dog next to a dog"
    assert expand_prompt(p.prompts[1], s, False) == "a dog next to a dog"


def test_overrides_change_the_hash(tmp_path):
    path = str(write(tmp_path, GOOD))
    a = load_protocol(path)
    b = load_protocol(path, ["generation.steps=25", "subjects.0.trigger=zwx", "generation.guidance_scale=3"])
    assert b.generation.steps == 25 and b.subjects[0].trigger == "zwx" and b.generation.guidance_scale == 3.0
    assert a.sha256 != b.sha256
    assert load_protocol(path).sha256 == a.sha256  # deterministic


def test_seeds_are_deterministic_and_distinct():
    seeds = {derive_seed(0, p, k) for p in range(10) for k in range(10)}
    assert len(seeds) == 100
    assert derive_seed(3, 1, 2) == derive_seed(3, 1, 2) != derive_seed(4, 1, 2)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(colour="red"), "unknown field 'colour'"),
    (lambda d: d["generation"].update(stepz=3), "unknown field 'generation.stepz'"),
    (lambda d: d["generation"].update(steps="many"), "field 'generation.steps' must be an integer"),
    (lambda d: d["generation"].update(scheduler="magic"), "field 'generation.scheduler' must be one of"),
    (lambda d: d["generation"].update(resolution=30), "multiple of 8"),
    (lambda d: d.update(prompts=[]), "field 'prompts' must be a non-empty list"),
    (lambda d: d.update(prompts=["a photo of a dog"]), "field 'prompts.0' must be a string containing '{subject}'"),
    (lambda d: d.pop("base_model"), "missing required field 'base_model'"),
    (lambda d: d["subjects"][0].pop("trigger"), "missing required field 'subjects.0.trigger'"),
    (lambda d: d.update(metrics=["kps", "fid"]), "unknown metric 'fid'"),
    (lambda d: d.update(subjects="dog"), "field 'subjects' must be a non-empty list"),
])
def test_bad_protocols_name_file_and_field(tmp_path, mutate, message):
    import copy

    d = copy.deepcopy(GOOD)
    mutate(d)
    path = write(tmp_path, d)
    with pytest.raises(UserError) as e:
        load_protocol(str(path))
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_protocol(str(tmp_path / "nope.yaml"))
    with pytest.raises(UserError, match="Unknown protocol 'no-such-protocol'"):
        load_protocol("no-such-protocol")
    bad = write(tmp_path, "name: [unclosed\n", "bad.yaml")
    with pytest.raises(UserError, match="not valid YAML"):
        load_protocol(str(bad))
    with pytest.raises(UserError, match="must look like dotted.key=value"):
        load_protocol(str(write(tmp_path, GOOD)), ["generation.steps"])
    with pytest.raises(UserError, match="not an index"):
        load_protocol(str(write(tmp_path, GOOD)), ["subjects.3.trigger=x"])


# ----------------------------------------------------------------------------- prompt sets and references_root

SETS = {**{k: v for k, v in GOOD.items() if k not in ("prompts", "subjects")},
        "subjects": [{"name": "dog", "class_noun": "dog", "trigger": "sks", "references": "dog", "prompt_set": "live"},
                     {"name": "pot", "class_noun": "teapot", "trigger": "sks", "references": "pot", "prompt_set": "object"}],
        "prompt_sets": {"object": ["a {subject} on a table", "a red {subject}", "a wet {subject}"],
                        "live": ["a {subject} wearing a hat", "a red {subject}"]}}


def test_each_subject_takes_its_prompt_set(tmp_path):
    p = load_protocol(str(write(tmp_path, SETS)))
    dog, pot = p.subjects
    assert p.prompts_for(dog) == ("a {subject} wearing a hat", "a red {subject}")
    assert p.prompts_for(pot) == ("a {subject} on a table", "a red {subject}", "a wet {subject}")
    # a subject without prompt_set takes `prompts`
    mixed = load_protocol(str(write(tmp_path, {**SETS, "prompts": ["a photo of a {subject}"]})), ["subjects.1.prompt_set="])
    assert mixed.prompts_for(mixed.subjects[1]) == ("a photo of a {subject}",)
    assert mixed.prompts_for(mixed.subjects[0]) == p.prompts_for(dog)
    # the set is part of the hash
    assert load_protocol(str(write(tmp_path, SETS)), ["prompt_sets.live.0=a {subject} in a hat"]).sha256 != p.sha256


def test_protocols_without_the_new_fields_record_and_hash_what_they_did(tmp_path):
    d = load_protocol(str(write(tmp_path, GOOD))).to_dict()
    assert "prompt_sets" not in d and "references_root" not in d and "prompt_set" not in d["subjects"][0]


def test_references_root_is_recorded_but_not_hashed(tmp_path, monkeypatch):
    path = str(write(tmp_path, {**SETS, "references_root": "${KPS_TEST_ROOT}/data"}))
    a, b = load_protocol(path), load_protocol(path, ["references_root=/elsewhere"])
    assert a.sha256 == b.sha256 and b.to_dict()["references_root"] == "/elsewhere"
    monkeypatch.setenv("KPS_TEST_ROOT", str(tmp_path))
    assert a.references_dir(a.subjects[1]) == tmp_path / "data" / "pot"
    assert b.references_dir(b.subjects[0]) == __import__("pathlib").Path("/elsewhere/dog")
    monkeypatch.delenv("KPS_TEST_ROOT")
    with pytest.raises(UserError, match="environment variable KPS_TEST_ROOT, which is not set.*--set references_root=PATH"):
        a.references_dir(a.subjects[0])


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["subjects"][0].update(prompt_set="pets"),
     "field 'subjects.0.prompt_set' is 'pets', which is not in 'prompt_sets'; expected one of: live, object"),
    (lambda d: d["subjects"][1].pop("prompt_set"),
     "field 'subjects.1.prompt_set' is required because the protocol has no 'prompts' list"),
    (lambda d: d.pop("prompt_sets"), "missing required field 'prompts'"),
    (lambda d: d.update(prompt_sets=["a {subject}"]), "field 'prompt_sets' must be a non-empty mapping"),
    (lambda d: d["prompt_sets"].update(live=[]), "field 'prompt_sets.live' must be a non-empty list"),
    (lambda d: d["prompt_sets"]["object"].append("a teapot"),
     "field 'prompt_sets.object.3' must be a string containing '{subject}'"),
    (lambda d: d.update(prompts=["a photo"]), "field 'prompts.0' must be a string containing '{subject}'"),
])
def test_bad_prompt_sets_name_the_field(tmp_path, mutate, message):
    import copy

    d = copy.deepcopy(SETS)
    mutate(d)
    with pytest.raises(UserError) as e:
        load_protocol(str(write(tmp_path, d)))
    assert message in str(e.value)
