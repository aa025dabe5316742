"""SDXL (issue 16 §5): `tiny-models --sdxl`, `run` with its LoRA and two-encoder textual inversion, the resolution
warning, and trainers that refuse SDXL."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from kps_bench.cli import main
from kps_bench.family import SD, SDXL, BaseFamily, base_family
from kps_bench.generate import sample
from kps_bench.models import (LORA_FILE, TI_FILE, apply_adapter, check_adapter_fits, count_lora_layers, load_pipeline,
                              resolve_adapter)
from kps_bench.protocol import load_protocol
from kps_bench.tiny import HIDDEN, HIDDEN_2


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    """What `kps-bench tiny-models --sdxl` writes: the tiny models, sdxl/{pipeline,lora,textual-inversion} and
    tiny-sdxl.yaml."""
    out = tmp_path_factory.mktemp("tiny-xl")
    r = cli("tiny-models", "--out", out, "--sdxl", "--force")
    assert r.exit_code == 0, r.output
    assert f"--protocol {out / 'tiny-sdxl.yaml'} --adapter {out / 'sdxl' / 'lora'}" in r.output
    return out


def load_base(tiny_xl):
    return load_pipeline("sdxl/pipeline", str(tiny_xl / "sdxl" / "pipeline"), "cpu", "float32", "ddim")


def images(pipe, prompts, tiny_xl):
    """The protocol's pixels ``[n, 32, 32, 3]`` for ``prompts``, seeds 0..n-1."""
    gen = load_protocol(str(tiny_xl / "tiny-sdxl.yaml")).generation
    return torch.from_numpy(next(sample(pipe, prompts, list(range(len(prompts))), gen, len(prompts)))[1])


def test_tiny_models_sdxl_writes_a_two_encoder_pipeline_lora_and_embedding(tiny_xl):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_xl / "sdxl" / "pipeline")
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == HIDDEN + HIDDEN_2
    lora = load_file(str(tiny_xl / "sdxl" / "lora" / LORA_FILE))
    assert {k.split(".")[0] for k in lora} == {"unet", "text_encoder", "text_encoder_2"}
    ti = load_file(str(tiny_xl / "sdxl" / "textual-inversion" / TI_FILE))
    assert {k: list(v.shape) for k, v in ti.items()} == {"clip_l": [1, HIDDEN], "clip_g": [1, HIDDEN_2]}


def test_sdxl_lora_changes_the_images_and_disabling_it_gives_the_base_back(tiny_xl):
    base = load_base(tiny_xl)
    prompts = ["a photo of a sks block", "a block on a table"]
    before = images(base.pipe, prompts, tiny_xl)
    lora = resolve_adapter(str(tiny_xl / "sdxl" / "lora"), "auto", False)
    assert check_adapter_fits(base.pipe, lora, ["sks"]) == {
        "modules": {"text_encoder": 8, "text_encoder_2": 8, "unet": 32}}
    pipe = apply_adapter(base, lora, ["sks"], "cpu", "float32", "ddim")
    assert count_lora_layers(pipe) == 48
    with_lora = images(pipe, prompts, tiny_xl)
    assert (with_lora - before).abs().amax(dim=(1, 2, 3)).min() > 0.01  # every image changed
    pipe.disable_lora()
    assert torch.equal(images(pipe, prompts, tiny_xl), before)


def test_sdxl_textual_inversion_loads_into_both_text_encoders(tiny_xl):
    base = load_base(tiny_xl)
    prompts = ["a photo of a sks block", "a photo of a block"]
    before = images(base.pipe, prompts, tiny_xl)
    pipe = apply_adapter(base, resolve_adapter(str(tiny_xl / "sdxl" / "textual-inversion"), "auto", False), ["sks"],
                         "cpu", "float32", "ddim")
    learned = load_file(str(tiny_xl / "sdxl" / "textual-inversion" / TI_FILE))
    for encoder, tokenizer, key in [("text_encoder", "tokenizer", "clip_l"),
                                    ("text_encoder_2", "tokenizer_2", "clip_g")]:
        tok = getattr(pipe, tokenizer)
        assert "sks" in tok.get_vocab()
        row = getattr(pipe, encoder).get_input_embeddings().weight[tok.convert_tokens_to_ids("sks")]
        assert torch.equal(row, learned[key][0])
    after = images(pipe, prompts, tiny_xl)
    assert not torch.equal(after[0], before[0])  # the trigger prompt uses the learned embeddings
    assert torch.equal(after[1], before[1])  # a prompt without the trigger is the base's


def test_run_on_tiny_sdxl_base_lora_textual_inversion_and_pipeline(tiny_xl, tmp_path):
    protocol = tiny_xl / "tiny-sdxl.yaml"
    common = ["--protocol", protocol, "--subject", "red-block", "--device", "cpu", "--set", "prompts=['a {subject}']",
              "--cache-dir", tmp_path / "cache"]
    results = {}
    for kind, adapter in (("none", None), ("lora", "lora"), ("textual-inversion", "textual-inversion"),
                          ("pipeline", "pipeline")):
        extra = ["--adapter", tiny_xl / "sdxl" / adapter] if adapter else ["--adapter-kind", "none"]
        r = cli("run", *common, *extra, "--out", tmp_path / kind)
        assert r.exit_code == 0, r.output
        assert "does not suit the base model" not in r.output  # the tiny SDXL draws at its native 32 px
        results[kind] = json.loads((tmp_path / kind / "results.json").read_text())
    prov = {kind: res["provenance"] for kind, res in results.items()}
    assert {p["base_model"]["pipeline_class"] for p in prov.values()} == {"StableDiffusionXLPipeline"}
    assert prov["none"]["images_made"] == {"base": 4}  # without an adapter the base draws the trigger prompts too
    assert all(prov[k]["images_made"]["base"] == 0 for k in ("lora", "textual-inversion", "pipeline"))
    assert prov["lora"]["adapter"]["targets"] == {"modules": {"text_encoder": 8, "text_encoder_2": 8, "unet": 32}}
    assert prov["textual-inversion"]["adapter"]["targets"] == {
        "token": "sks", "text_encoders": {"text_encoder": [1, HIDDEN], "text_encoder_2": [1, HIDDEN_2]}}
    # the base as its own adapter, and a textual inversion on trigger-free prompts, draw the base's images
    assert results["pipeline"]["metrics"]["red-block"]["preservation"]["value"] == 1.0
    assert results["textual-inversion"]["metrics"]["red-block"]["preservation"]["value"] == 1.0


def test_a_one_encoder_embedding_on_sdxl_and_an_sdxl_embedding_on_sd_are_refused(tiny_xl, tmp_path):
    r = cli("run", "--protocol", tiny_xl / "tiny-sdxl.yaml", "--adapter", tiny_xl / "textual-inversion", "--subject",
            "red-block", "--device", "cpu", "--out", tmp_path / "a")
    assert r.exit_code == 2, r.output
    message = " ".join(r.output.split())
    assert "holds a one-encoder embedding (sks), but the base model is SDXL" in message
    assert (f"'clip_l' [vectors, {HIDDEN}] for text_encoder and 'clip_g' [vectors, {HIDDEN_2}] for "
            f"text_encoder_2") in message
    r = cli("run", "--protocol", tiny_xl / "tiny.yaml", "--adapter", tiny_xl / "sdxl" / "textual-inversion",
            "--subject", "red-block", "--device", "cpu", "--out", tmp_path / "b")
    assert r.exit_code == 2, r.output
    assert "is an SDXL embedding ('clip_l' and 'clip_g'" in " ".join(r.output.split())
    save_file({"clip_l": torch.zeros(1, HIDDEN), "clip_g": torch.zeros(1, HIDDEN)}, str(tmp_path / TI_FILE))
    r = cli("run", "--protocol", tiny_xl / "tiny-sdxl.yaml", "--adapter", tmp_path / TI_FILE, "--subject",
            "red-block", "--device", "cpu", "--out", tmp_path / "c")
    assert r.exit_code == 2, r.output
    assert (f"embedding 'clip_g' has size {HIDDEN}, but the base model's text_encoder_2 uses embeddings of size "
            f"{HIDDEN_2}") in " ".join(r.output.split())
    assert not [p for d in "abc" for p in (tmp_path / d).glob("images/*.png")]


def test_the_resolution_warning_follows_the_base_family():
    sdxl, sd15 = BaseFamily(SDXL, "StableDiffusionXLPipeline", 1024), BaseFamily(SD, "StableDiffusionPipeline", 512)
    warning = sdxl.resolution_warning(512)
    assert "generation.resolution 512 px does not suit the base model: it is SDXL" in warning
    assert "native resolution 1024 px" in warning and "--set generation.resolution=1024" in warning
    assert sdxl.resolution_warning(1024) is None
    assert "native resolution 512 px, and above 768 px" in sd15.resolution_warning(1024)
    assert sd15.resolution_warning(768) is None and sd15.resolution_warning(256) is None
    assert BaseFamily(SD, "StableDiffusionPipeline", 768).resolution_warning(768) is None  # SD 2.1
    assert BaseFamily(None, "FluxPipeline", None).resolution_warning(64) is None


def test_the_family_is_read_from_the_loaded_pipeline_and_a_mismatch_is_warned(tiny_xl, tmp_path):
    assert base_family(load_base(tiny_xl).pipe) == BaseFamily(SDXL, "StableDiffusionXLPipeline", 32)
    sd = load_pipeline("pipeline", str(tiny_xl / "pipeline"), "cpu", "float32", "ddim")
    assert base_family(sd.pipe) == BaseFamily(SD, "StableDiffusionPipeline", 32)
    r = cli("run", "--protocol", tiny_xl / "tiny-sdxl.yaml", "--adapter-kind", "none", "--subject", "red-block",
            "--device", "cpu", "--set", "generation.resolution=16", "--set", "prompts=['a {subject}']", "--dry-run",
            "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert ("warning: generation.resolution 16 px does not suit the base model: it is SDXL "
            "(StableDiffusionXLPipeline), native resolution 32 px") in " ".join(r.output.split())


@pytest.mark.parametrize("method", ["cat", "lora", "dreambooth", "textual-inversion"])
def test_train_baseline_says_it_does_not_train_sdxl(tiny_xl, tmp_path, method):
    out = tmp_path / "adapter"
    r = cli("train-baseline", method, "--protocol", tiny_xl / "tiny-sdxl.yaml", "--subject", "red-block", "--out",
            out, "--device", "cpu", "--set", "steps=2")
    assert r.exit_code == 2, r.output
    message = " ".join(r.output.split())
    assert "is SDXL (StableDiffusionXLPipeline), and train-baseline does not train SDXL" in message
    assert "train Stable Diffusion 1.x/2.x pipelines" in message and "kps-bench run --adapter" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no adapter, no OUT.partial, no lock file left


def test_the_declared_pipeline_class_is_read_without_loading(tiny_xl, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from kps_bench.family import declared_pipeline_class, family_of

    assert declared_pipeline_class(str(tiny_xl / "sdxl" / "pipeline")) is StableDiffusionXLPipeline
    assert declared_pipeline_class(str(tiny_xl / "pipeline")) is StableDiffusionPipeline
    assert (family_of(StableDiffusionXLPipeline), family_of(StableDiffusionPipeline)) == (SDXL, SD)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchPipeline"}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text("{not json")
    for where in (tmp_path / "odd", tmp_path / "broken", tmp_path, tmp_path / "missing", "no-org/not-cached-model"):
        assert declared_pipeline_class(str(where)) is None, where  # loading the pipeline then says what is wrong


def test_train_baseline_refuses_sdxl_before_loading_it(tiny_xl, tmp_path):
    """A base folder with SDXL's model_index.json and no weights: the refusal comes from model_index.json alone
    (loading it would fail with 'Cannot load the diffusers pipeline')."""
    index_only = tiny_xl / "sdxl" / "index-only"
    index_only.mkdir(exist_ok=True)
    (index_only / "model_index.json").write_bytes((tiny_xl / "sdxl" / "pipeline" / "model_index.json").read_bytes())
    protocol = tiny_xl / "tiny-sdxl-index-only.yaml"
    text = (tiny_xl / "tiny-sdxl.yaml").read_text()
    assert "base_model: sdxl/pipeline\n" in text
    protocol.write_text(text.replace("base_model: sdxl/pipeline\n", "base_model: sdxl/index-only\n"))
    r = cli("train-baseline", "lora", "--protocol", protocol, "--subject", "red-block", "--out", tmp_path / "adapter",
            "--device", "cpu")
    assert r.exit_code == 2, r.output
    assert ("Base model 'sdxl/index-only' is SDXL (StableDiffusionXLPipeline), and train-baseline does not train "
            "SDXL") in " ".join(r.output.split())
    assert list(tmp_path.iterdir()) == []
