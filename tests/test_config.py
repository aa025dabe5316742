"""The one config layer (issue 15 §2): coercion, --set, search paths, and `inherit:` for recipe files and for the
protocol's training sections."""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from kps_bench.cli import main
from kps_bench.config import PROTOCOLS, RECIPES, apply_sets, coerce, list_files, search_dirs
from kps_bench.errors import UserError
from kps_bench.protocol import load_protocol
from kps_bench.train import load_recipe
from kps_bench.train.output import partial_dir
from kps_bench.train.recipe import recipe_file_layers

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- coercion


@pytest.mark.parametrize("type_name, value, expected", [
    ("int", 3, 3), ("float", 3, 3.0), ("float", "1e-4", 1e-4), ("float", "2", 2.0), ("str", "ddim", "ddim"),
    ("str", 1.0, "1.0"), ("str", 2, "2"), ("bool", False, False), ("tuple[str, ...]", ["a", "b"], ("a", "b")),
])
def test_coercion_accepts(type_name, value, expected):
    got = coerce(value, type_name, "f", "w")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("type_name, value, message", [
    ("int", True, "field 'f' must be an integer, got True (bool)"),
    ("int", 2.5, "field 'f' must be an integer, got 2.5 (float)"),
    ("int", "3", "field 'f' must be an integer, got '3' (str)"),
    ("float", "fast", "field 'f' must be a number, got 'fast' (str)"),
    ("float", float("nan"), "field 'f' must be a finite number, got nan"),
    ("float", "inf", "field 'f' must be a finite number, got inf"),
    ("float", False, "field 'f' must be a number, got False (bool)"),
    ("str", True, "field 'f' must be a string, got True (bool)"),
    ("str", ["a"], "field 'f' must be a string, got ['a'] (list)"),
    ("bool", "true", "field 'f' must be true or false, got 'true' (str)"),
    ("bool", 1, "field 'f' must be true or false, got 1 (int)"),
    ("tuple[str, ...]", "a", "field 'f' must be a list of strings, got 'a' (str)"),
    ("tuple[str, ...]", ["a", 1], "field 'f' must be a list of strings, got ['a', 1] (list)"),
])
def test_coercion_refuses_naming_where_and_field(type_name, value, message):
    with pytest.raises(UserError) as e:
        coerce(value, type_name, "f", "file.yaml")
    assert str(e.value) == f"file.yaml: {message}."


def test_protocols_and_recipes_coerce_alike(tmp_path):
    """The two rules that used to differ: a float field takes a numeric string in a protocol too (it was refused),
    and a string field takes a number in a recipe too (it was refused)."""
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "version": 1.5, "base_model": "m", "prompts": ["a {subject}"],
                                 "generation": {"guidance_scale": "1e1"},
                                 "subjects": [{"name": "d", "class_noun": "dog", "trigger": "sks", "references": "r"}]}))
    prot = load_protocol(str(p))
    assert prot.generation.guidance_scale == 10.0 and prot.version == "1.5"
    assert load_protocol(str(p), ["generation.guidance_scale=1e1"]).generation.guidance_scale == 10.0
    r, _ = load_recipe("lora", None, ["learning_rate=1e-3", "adam_epsilon=1e-8"])
    assert (r.learning_rate, r.adam_epsilon) == (1e-3, 1e-8)
    with pytest.raises(UserError, match="field 'lr_scheduler' must be one of linear, cosine"):
        load_recipe("lora", None, ["lr_scheduler=5"])  # a string now, then refused by its own check
    with pytest.raises(UserError, match="--set: field 'steps' must be an integer, got 'many'"):
        load_recipe("lora", None, ["steps=many"])


# ----------------------------------------------------------------------------- --set


def test_set_reaches_into_lists_and_sections_in_both():
    raw = {"a": {"b": [1, {"c": 2}]}, "d": 3}
    assert apply_sets(raw, ["a.b.0=5", "a.b.1.c=x", "e.f=[1, 2]", "d="], "w", "ex") == {
        "a": {"b": [5, {"c": "x"}]}, "d": "", "e": {"f": [1, 2]}}
    assert raw == {"a": {"b": [1, {"c": 2}]}, "d": 3}  # a copy
    r, sources = load_recipe("lora", None, ["captions=['a {subject}', 'a photo of a {subject}']",
                                             "captions.1=a drawing of a {subject}", "target_modules.3=proj"])
    assert r.captions == ("a {subject}", "a drawing of a {subject}")
    assert r.target_modules == ("to_q", "to_k", "to_v", "proj") and sources[-1] == "--set"


@pytest.mark.parametrize("sets, message", [
    (["steps"], "--set 'steps' must look like dotted.key=value, e.g. --set steps=200"),
    (["captions.0=a {subject}"], "--set captions.0: '0' is not an index of the list at 'captions' in the recipe "
                                 "(it has 0 items)"),
    (["rank.x=1"], "--set rank.x: 'rank' in the recipe is a value, not a section"),
    (["rnk=4"], "--set: unknown field 'rnk' for method 'lora'. Allowed fields: steps,"),
    (["cat_weight=0.5"], "--set: unknown field 'cat_weight' for method 'lora' ('cat_weight' is only used by cat)"),
    (["method=cat"], "--set: field 'method' is 'cat' but this is the 'lora' recipe"),
    (["seed=-1"], "field 'seed' must be an integer >= 0, got -1"),
])
def test_bad_recipe_sets(sets, message):
    with pytest.raises(UserError) as e:
        load_recipe("lora", None, sets)
    assert message in str(e.value)


# ----------------------------------------------------------------------------- search paths and files


def test_search_paths_env_then_working_folder_then_package(tmp_path, monkeypatch):
    extra = tmp_path / "mine"
    extra.mkdir()
    (extra / "lora.yaml").write_text("method: lora\nsteps: 3\n")
    monkeypatch.setenv("KPS_BENCH_BASELINES", str(extra))
    dirs = search_dirs(RECIPES)
    assert dirs[0] == extra and dirs[1] == REPO / "baselines" and len(dirs) == len({d.resolve() for d in dirs})
    assert list_files(RECIPES)["lora"] == extra / "lora.yaml" and list_files(RECIPES)["cat"].parent == dirs[1]
    assert list_files(PROTOCOLS)["shapes-world"] == REPO / "protocols" / "shapes-world.yaml"
    # the shipped cat recipe inherits `lora` by name, so it takes this lora: 3 steps, the rest defaults
    r, sources = load_recipe("cat")
    assert (r.steps, r.rank, r.cat_weight) == (3, 1, 1.0) and sources == [str(extra / "lora.yaml"),
                                                                        str(REPO / "baselines" / "cat.yaml")]


@pytest.mark.parametrize("text, message", [
    ("[1, 2]\n", "must hold a mapping of hyperparameters (method, steps, learning_rate, ...), got list"),
    ("", "must hold a mapping of hyperparameters"),
    ("steps: [unclosed\n", "is not valid YAML"),
    (b"steps: caf\xe9\n", "is not UTF-8 text"),
])
def test_unreadable_recipe_files_are_named(tmp_path, monkeypatch, text, message):
    (tmp_path / "lora.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    monkeypatch.setenv("KPS_BENCH_BASELINES", str(tmp_path))
    with pytest.raises(UserError) as e:
        load_recipe("lora")
    assert f"Recipe file '{tmp_path / 'lora.yaml'}' {message}" in str(e.value)


# ----------------------------------------------------------------------------- inherit: in recipe files


def test_shipped_cat_is_lora_plus_the_cat_loss():
    layers = recipe_file_layers("cat")
    assert [Path(w).name for w, _ in layers] == ["lora.yaml", "cat.yaml"]
    assert yaml.safe_load((REPO / "baselines" / "cat.yaml").read_text()) == {"inherit": "lora", "method": "cat",
                                                                             "cat_weight": 1.0}
    # the shapes world lowers lambda (its round subjects come apart at 1: kps_bench/train/README.md)
    for protocol, weight in ((None, 1.0), (load_protocol("shapes-world"), 0.05), (load_protocol("dreambench"), 1.0)):
        cat, lora = load_recipe("cat", protocol)[0].to_dict(), load_recipe("lora", protocol)[0].to_dict()
        assert cat.pop("cat_weight") == weight and cat.pop("method") == "cat" and lora.pop("method") == "lora"
        assert cat == lora


def _recipes(tmp_path, monkeypatch, **files):
    for name, data in files.items():
        (tmp_path / f"{name.replace('_', '-')}.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("KPS_BENCH_BASELINES", str(tmp_path))


def test_a_recipe_inherits_and_overrides(tmp_path, monkeypatch):
    _recipes(tmp_path, monkeypatch, cat={"inherit": "lora", "method": "cat", "rank": 4, "cat_weight": 0.3})
    r, sources = load_recipe("cat")
    assert (r.rank, r.cat_weight, r.learning_rate, r.steps, r.seed) == (4, 0.3, 1e-4, 900, 42)
    assert sources == [str(REPO / "baselines" / "lora.yaml"), str(tmp_path / "cat.yaml")]


@pytest.mark.parametrize("files, message", [
    ({"cat": {"inherit": "lora", "method": "cat"}, "lora": {"inherit": "cat", "method": "lora"}},
     "{d}/lora.yaml: field 'inherit' makes a cycle ({d}/cat.yaml -> {d}/lora.yaml -> {d}/cat.yaml)"),
    ({"cat": {"inherit": "cat", "method": "cat"}}, "field 'inherit' makes a cycle ({d}/cat.yaml -> {d}/cat.yaml)"),
    ({"cat": {"inherit": "lorra", "method": "cat"}},
     "{d}/cat.yaml: field 'inherit' names 'lorra', which is not a known recipe; expected one of: cat, dreambooth, "
     "lora, textual-inversion"),
    ({"cat": {"inherit": ["lora"], "method": "cat"}},
     "{d}/cat.yaml: field 'inherit' must be the name of another recipe, got ['lora']"),
    ({"cat": {"inherit": "dreambooth", "method": "cat"}},
     "baselines/dreambooth.yaml: unknown field 'prior_loss_weight' for method 'cat' ('prior_loss_weight' is only used "
     "by dreambooth)"),
    ({"cat": {"inherit": "lora"}}, "baselines/lora.yaml: field 'method' is 'lora' but this is the 'cat' recipe"),
])
def test_bad_inheritance_names_the_file_and_field(tmp_path, monkeypatch, files, message):
    _recipes(tmp_path, monkeypatch, **files)
    with pytest.raises(UserError) as e:
        load_recipe("cat")
    assert message.format(d=tmp_path) in str(e.value)


def test_train_baseline_refuses_a_cycle_with_exit_2(tmp_path, monkeypatch, tiny_protocol):
    d = tmp_path / "recipes"
    d.mkdir()
    _recipes(d, monkeypatch, lora={"inherit": "textual-inversion", "method": "lora"},
             textual_inversion={"inherit": "lora", "method": "textual-inversion"})
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["train-baseline", "lora", "--protocol", str(tiny_protocol), "--subject",
                                  "red-block", "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert f"Error: {d}/textual-inversion.yaml: field 'inherit' makes a cycle ({d}/lora.yaml -> " \
           f"{d}/textual-inversion.yaml -> " \
           f"{d}/lora.yaml). Let one of them inherit nothing." in r.output
    assert not out.exists() and not partial_dir(out).exists()


# ----------------------------------------------------------------------------- inherit: in a protocol's training


def test_a_protocol_section_inherits_another(protocol_copy):
    p = load_protocol(str(protocol_copy(training={"defaults": {"steps": 7, "captions": ["a {subject}"]},
                                   "lora": {"rank": 4, "learning_rate": 3e-3}, "cat": {"inherit": "lora", "rank": 2}})))
    cat, sources = load_recipe("cat", p)
    assert (cat.steps, cat.rank, cat.learning_rate, cat.cat_weight) == (7, 2, 3e-3, 1.0)
    where = "protocol 'tiny' training"
    assert sources[2:] == [f"{where}.defaults", f"{where}.lora", f"{where}.cat"]
    lora, _ = load_recipe("lora", p)
    assert (lora.rank, lora.learning_rate) == (4, 3e-3)
    cat_d, lora_d = cat.to_dict(), lora.to_dict()
    assert {k for k in cat_d if cat_d[k] != lora_d.get(k)} == {"method", "cat_weight", "rank"}


@pytest.mark.parametrize("training, message", [
    ({"lora": {"inherit": "cat"}, "cat": {"inherit": "lora"}},
     "protocol 'tiny' training.lora: field 'inherit' makes a cycle (protocol 'tiny' training.cat -> protocol 'tiny' "
     "training.lora -> protocol 'tiny' training.cat)"),
    ({"cat": {"inherit": "lora"}},
     "protocol 'tiny' training.cat: field 'inherit' names 'lora', which is not a known method section of 'training'; "
     "expected one of: cat"),
    ({"cat": {"inherit": "defaults"}, "defaults": {}},
     "field 'inherit' names 'defaults', which is not a known method section of 'training'; expected one of: cat"),
    ({"defaults": {"inherit": "lora"}}, "protocol 'tiny' training.defaults: field 'inherit' belongs in a method "
                                        "section (e.g. training.cat: {inherit: lora})"),
    ({"cat": {"inherit": "dreambooth"}, "dreambooth": {"num_class_images": 3}},
     "protocol 'tiny' training.dreambooth: unknown field 'num_class_images' for method 'cat'"),
    ({"cat": ["rank", 2]}, "protocol 'tiny' training.cat: must be a mapping of recipe fields, got list"),
    ({"kat": {}}, "protocol 'tiny' training: unknown section 'kat'; expected 'defaults' or a method"),
])
def test_bad_protocol_sections_name_the_section_and_field(protocol_copy, training, message):
    defaults = {"captions": ["a {subject}"], **training.get("defaults", {})}
    p = load_protocol(str(protocol_copy(training={**training, "defaults": defaults})))
    with pytest.raises(UserError) as e:
        load_recipe("cat", p)
    assert message in str(e.value)
    r = CliRunner().invoke(main, ["protocols", "validate", p.file])
    assert r.exit_code == 2 and message in r.output
