"""Tests of the built-in shapes world (issue 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kps_bench.world import WORLD_DIR, resolve_builtin
from kps_bench.world.render import (BACKGROUNDS, BASE_COLOURS, SHAPES, Factors, caption, caption_claims,
                                    claims_matrix, describes, render, sample_dataset)

SHIPPED = (WORLD_DIR / "pipeline" / "model_index.json").exists() and (WORLD_DIR / "probe" / "config.json").exists()
needs_world = pytest.mark.skipif(not SHIPPED, reason="shipped shapes world missing (run kps-bench world build)")


# ------------------------------------------------------------------------------------ rendering
def test_rendering_is_deterministic_for_a_seed():
    a, fa, ca = sample_dataset(64, seed=7)
    b, fb, cb = sample_dataset(64, seed=7)
    c, _, _ = sample_dataset(64, seed=8)
    assert a.shape == (64, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and ca == cb and [f.to_dict() for f in fa] == [f.to_dict() for f in fb]
    assert not np.array_equal(a, c)


def test_images_keep_their_factor_labels_and_captions_name_them():
    imgs, fs, caps = sample_dataset(200, seed=1)
    for im, f, cap in zip(imgs[:20], fs[:20], caps[:20]):
        assert np.array_equal(im, render(f))  # the label re-renders the image exactly
        assert cap.startswith("a ") and f.shape in cap
    # short class prompts and full prompts both occur
    assert any(c in {f"a {s}" for s in SHAPES} for c in caps)
    assert any(c.endswith("background") for c in caps)
    assert len({f.colour for f in fs}) == len(BASE_COLOURS) and len({f.background for f in fs}) == len(BACKGROUNDS)


def test_full_caption_format():
    f = Factors(shape="star", colour="red", pattern="striped", background="blue", size="small")
    assert caption(f) == "a small red striped star on a blue background"


def test_caption_claims_are_what_a_caption_states():
    assert caption_claims("a small red striped star on a sky background") == {
        "size": "small", "colour": "red", "pattern": "striped", "shape": "star", "background": "sky"}
    assert caption_claims("a star") == {"shape": "star"}
    red_star = Factors(shape="star", colour="red", pattern="dotted", background="sky")
    assert describes(caption_claims("a star"), red_star)  # omitted factors are not claimed
    assert describes(caption_claims("a red star on a sky background"), red_star)
    assert not describes(caption_claims("a blue star"), red_star)
    assert not describes(caption_claims("a star on a white background"), red_star)
    imgs, fs, caps = sample_dataset(100, seed=3)
    assert all(describes(caption_claims(c), f) for c, f in zip(caps, fs))
    claims = [caption_claims(c) for c in caps[:40]]
    m = claims_matrix(claims, fs[:30])
    assert m.shape == (30, 40) and m.any() and not m.all()
    assert all(m[i, j] == describes(claims[j], fs[i]) for i in range(30) for j in range(40))


def test_vae_posterior_std_is_the_decoder_training_noise():
    """The VAE is trained on the posterior mean plus noise; its posterior must sample that noise,
    not the untrained log-variance head (which has std ~ 1)."""
    import torch
    from diffusers import AutoencoderKL

    from kps_bench.world import train as T

    torch.manual_seed(0)
    vae = AutoencoderKL(**T.vae_config()).eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert vae.encode(x).latent_dist.std.mean() > 0.5  # untrained: far too wide
    T.set_posterior_std(vae, 0.05)
    d = vae.encode(x).latent_dist
    assert torch.allclose(d.std, torch.full_like(d.std, 0.05), rtol=1e-5)
    assert torch.equal(d.mean, vae.encode(x).latent_dist.mean)  # the mean is untouched


@needs_world
def test_builtin_resolution():
    assert resolve_builtin("builtin:shapes-world", "pipeline") == WORLD_DIR / "pipeline"
    assert resolve_builtin("builtin:shapes-world/dino") == WORLD_DIR / "dino"
    from kps_bench.errors import UserError

    with pytest.raises(UserError):
        resolve_builtin("builtin:no-such-world")
    with pytest.raises(UserError):
        resolve_builtin("builtin:shapes-world/no/such/file")


def test_builtin_spec_inverts_resolution(tmp_path):
    from kps_bench.world import builtin_spec

    for spec in ["builtin:shapes-world", "builtin:shapes-world/probe", "builtin:shapes-world/clip/open_clip_config.json"]:
        assert builtin_spec(resolve_builtin(spec)) == spec
    assert builtin_spec(tmp_path / "probe") == str(tmp_path / "probe")


def test_importing_the_world_is_cheap():
    code = "import sys, kps_bench.world, kps_bench.world.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------- shipped world
@needs_world
def test_shipped_world_files_and_size():
    from kps_bench.world.subjects import SUBJECTS

    assert len(SUBJECTS) >= 3
    for s in SUBJECTS:
        d = WORLD_DIR / "subjects" / s.name
        meta = json.loads((d / "subject.json").read_text())
        assert meta["trigger"] == s.trigger and meta["class_noun"] == s.class_noun
        assert all((d / f"ref_{i}.png").exists() for i in range(5))
    for p in ["clip/open_clip_config.json", "clip/open_clip_model.safetensors", "dino/config.json",
              "dino/preprocessor_config.json", "probe/config.json", "MODEL_CARD.md", "check.json",
              "pipeline/tokenizer/vocab.json", "pipeline/tokenizer/merges.txt"]:
        assert (WORLD_DIR / p).exists(), p
    size = sum(f.stat().st_size for f in WORLD_DIR.rglob("*") if f.is_file())
    assert size < 50 * 2 ** 20, f"shipped world is {size / 2 ** 20:.1f} MB"


@needs_world
def test_shipped_pipeline_loads_with_plain_diffusers():
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(WORLD_DIR / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype} == {torch.float32}
    out = pipe(["a red star", "a blue circle on a white background"], num_inference_steps=5, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, 32, 32, 3) and np.isfinite(out).all()


@needs_world
def test_tokenizer_is_the_real_clip_tokenizer():
    import open_clip
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(WORLD_DIR / "pipeline" / "tokenizer"))
    ref = open_clip.get_tokenizer("ViT-B-32")(["a small red striped sks star"])[0].tolist()
    ids = tok("a small red striped sks star").input_ids
    assert ids == ref[: len(ids)]


@needs_world
def test_shipped_clip_and_dino_load_like_user_checkpoints():
    import open_clip
    import torch
    from open_clip import factory
    from transformers import AutoImageProcessor, ViTModel

    cfg = json.loads((WORLD_DIR / "clip" / "open_clip_config.json").read_text())
    factory._MODEL_CONFIGS["test-shapes-clip"] = cfg
    model = open_clip.create_model("test-shapes-clip", pretrained=str(WORLD_DIR / "clip" / "open_clip_model.safetensors")).eval()
    tok = open_clip.get_tokenizer("test-shapes-clip")
    size = cfg["vision_cfg"]["image_size"]
    x = torch.zeros(1, 3, size, size)
    assert model.encode_image(x).shape[-1] == cfg["embed_dim"]
    assert model.encode_text(tok(["a star"])).shape[-1] == cfg["embed_dim"]

    vit = ViTModel.from_pretrained(str(WORLD_DIR / "dino"))
    proc = AutoImageProcessor.from_pretrained(str(WORLD_DIR / "dino"))
    from PIL import Image

    im = Image.open(WORLD_DIR / "subjects" / "purple-circle" / "ref_0.png")
    feats = vit(**proc(images=[im], return_tensors="pt")).last_hidden_state[:, 0]
    assert feats.shape == (1, vit.config.hidden_size)


@needs_world
def test_probe_reads_subject_references():
    from kps_bench.world.probe import predict_files
    from kps_bench.world.subjects import SUBJECTS, shows

    for s in SUBJECTS:
        labels = predict_files(sorted((WORLD_DIR / "subjects" / s.name).glob("ref_*.png")))
        assert all(shows(lbl, s.signature()) and lbl["shape"] == s.class_noun for lbl in labels), (s.name, labels)


def test_subjects_are_base_palette_looks_with_both_splits():
    from kps_bench.protocol import load_protocol
    from kps_bench.world.render import BASE_COLOURS, BASE_PATTERN_COLOURS
    from kps_bench.world.subjects import SUBJECTS

    assert len(SUBJECTS) >= 5 and len({s.class_noun for s in SUBJECTS}) >= 4
    assert sum(s.split == "evaluation" for s in SUBJECTS) == 3 and sum(s.split == "development" for s in SUBJECTS) == 4
    assert all(s.colour in BASE_COLOURS and s.pattern_colour in BASE_PATTERN_COLOURS and s.pattern != "plain"
               for s in SUBJECTS)
    prot = load_protocol("shapes-world")
    assert [(p.name, p.class_noun, p.trigger, p.split) for p in prot.subjects] == [
        (s.name, s.class_noun, s.trigger, s.split) for s in SUBJECTS]
    assert [p.name for p in prot.evaluation_subjects] == [s.name for s in SUBJECTS if s.split == "evaluation"]


def _shipped_gates() -> list[dict]:
    return json.loads((WORLD_DIR / "check.json").read_text())["gates"]


@needs_world
def test_shipped_check_json_holds_every_gate_and_every_gate_passes():
    """check.json is what `kps-bench world check --adapters` measured on the shipped weights: every gate is
    there, adapter gates included, and every one passes."""
    gates = _shipped_gates()
    names = " ".join(g["gate"] for g in gates)
    for part in ("DINO-slot k-NN (k=20) colour", "DINO-slot k-NN (k=20) pattern", "subject ceiling",
                 "adapters: lora trigger images show the signature (mean over training seeds 0, 1, 2",
                 "adapters: dreambooth identity CI", "adapters: cat trigger images show the requested shape",
                 "LoRA x3 steps minus base"):
        assert part in names, part
    assert [g["gate"] for g in gates if not g["passed"]] == []


def _tree_digest(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@needs_world
@pytest.mark.slow
def test_world_check_gates_hold_on_the_shipped_weights_and_never_write_the_package(tmp_path):
    """Every gate that needs no training, re-measured at the shipped sample size through `kps-bench world check`
    with the package's world folder read-only (the speed gate is timed, so left to its own run); any failing
    gate fails the test, the values are those check.json records, and no file of the world changes."""
    from click.testing import CliRunner

    from kps_bench.cli import main

    before = _tree_digest(WORLD_DIR)
    modes = {p: p.stat().st_mode for p in [WORLD_DIR, *WORLD_DIR.rglob("*")]}
    for p in modes:
        p.chmod(modes[p] & ~0o222)
    try:
        r = CliRunner().invoke(main, ["world", "check", "--out", str(tmp_path / "check")])
    finally:
        for p, m in modes.items():
            p.chmod(m)
    assert _tree_digest(WORLD_DIR) == before
    res = json.loads((tmp_path / "check" / "check.json").read_text())
    assert r.exit_code == (0 if res["all_passed"] else 1), r.output
    failed = [g for g in res["gates"] if not g["passed"] and not g["gate"].startswith("generation speed")]
    assert not failed, failed
    shipped = {g["gate"]: g["value"] for g in _shipped_gates()}
    for g in res["gates"]:
        if not g["gate"].startswith("generation speed"):
            assert g["value"] == pytest.approx(shipped[g["gate"]], abs=0.02), g
    assert res["n"] == 200


@needs_world
def test_world_card_records_a_check_of_that_world_only(tmp_path):
    """`world card` copies a check.json into the world folder it measured and rewrites the model card from it."""
    import shutil

    from click.testing import CliRunner

    from kps_bench.cli import main

    world = tmp_path / "world"
    for rel in ["build.json", "pipeline/model_index.json", "probe/config.json", "clip/open_clip_config.json",
                "dino/config.json"]:
        (world / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(WORLD_DIR / rel, world / rel)
    result = json.loads((WORLD_DIR / "check.json").read_text())
    other = tmp_path / "other.json"
    other.write_text(json.dumps(result))  # measured the shipped world, not this one
    r = CliRunner().invoke(main, ["world", "card", "--world", str(world), "--check", str(other)])
    assert r.exit_code == 2 and "measured the world" in r.output and not (world / "check.json").exists()
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({**result, "world": str(world)}))
    r = CliRunner().invoke(main, ["world", "card", "--world", str(world), "--check", str(mine)])
    assert r.exit_code == 0, r.output
    assert (world / "check.json").read_text() == mine.read_text()
    card = (world / "MODEL_CARD.md").read_text()
    first = result["gates"][0]
    assert first["gate"] in card and f"{first['value']:.3f}" in card


def test_a_failing_gate_is_reported_as_failed():
    from kps_bench.world.check import Gates

    g = Gates(10)
    g.add("high", 0.5, 0.9)
    g.add("low", 0.2, 0.05, op="<=")
    g.add("margin", 0.0, 0.0, op=">")
    g.add("ok", 0.95, 0.9)
    assert [r["passed"] for r in g.rows] == [False, False, False, True]


@needs_world
def test_identity_ceilings_order_renders_reconstructions_and_class_members():
    """The shipped CLIP rewards a subject's look, and the VAE keeps it: reconstructions stay well above
    random members of the class, and the probe sees the signature in every render."""
    from kps_bench.world.check import identity_ceilings, load_clip, load_pipeline
    from kps_bench.world.subjects import SUBJECTS

    res = identity_ceilings(load_clip(WORLD_DIR), load_pipeline(WORLD_DIR).vae, WORLD_DIR, n=16)
    assert sorted(res) == sorted(s.name for s in SUBJECTS)
    for c in res.values():
        assert c["n"] == 16 and c["signature_renders"] == 1.0 and c["signature_vae_reconstructions"] >= 0.9
        assert c["identity_renders"] >= c["identity_vae_reconstructions"] > c["identity_class_members"] + 0.1


@needs_world
def test_world_check_images_do_not_depend_on_the_batch_size():
    """world check samples through the product's generation code: one generator per image."""
    from kps_bench.world.check import generate, load_pipeline

    pipe = load_pipeline(WORLD_DIR)
    prompts = ["a red star", "a circle", "a blue heart on a white background"]
    a, _ = generate(pipe, prompts, seed=9, batch=3, steps=4)
    b, _ = generate(pipe, prompts, seed=9, batch=1, steps=4)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # within 1/255, as the product's own images
    assert np.abs(a[0].astype(int) - a[1].astype(int)).max() > 10  # and the images differ


# ------------------------------------------------------------------------------ ground truth
def test_tv_distance_is_hand_computed_and_independent_of_hash_order():
    from kps_bench.world.truth import tv_distance

    # a: red 3/4, blue 1/4; b: blue 1/2, green 1/2 -> (3/4 + 1/4 + 1/2) / 2
    assert tv_distance(["red"] * 3 + ["blue"], ["blue", "green"] * 2) == 0.75
    code = ("from kps_bench.world.truth import tv_distance as t; import string; "
            "a = [c for i, c in enumerate(string.ascii_lowercase) for _ in range(i % 7 + 1)]; "
            "print(repr(t(a, a[::3] + ['zz'] * 5)))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in range(4)}
    assert len(outs) == 1


@needs_world
@pytest.mark.slow
def test_truth_of_a_run_without_adapter(tmp_path):
    """Adapter images identical to the base images: no leakage, no knowledge shift; references: identity."""
    import shutil

    import torch
    from PIL import Image

    from kps_bench.world.check import generate, load_pipeline
    from kps_bench.world.truth import truth

    pipe = load_pipeline(WORLD_DIR)
    prompts = ["a circle", "a red circle on a white background", "a large circle"]
    imgs, _ = generate(pipe, [p for p in prompts for _ in range(4)], seed=1234, batch=12)
    rows = []
    (tmp_path / "img").mkdir()
    for i, im in enumerate(imgs):
        p = prompts[i // 4]
        Image.fromarray(im).save(tmp_path / "img" / f"b{i}.png")
        shutil.copy(tmp_path / "img" / f"b{i}.png", tmp_path / "img" / f"a{i}.png")
        common = {"subject": "purple-circle", "prompt_without_trigger": p, "seed": 1234 + i % 4, "prompt_index": i // 4}
        rows.append({"id": f"b{i}", "path": f"img/b{i}.png", "role": "base", "prompt": p, "has_trigger": False, **common})
        rows.append({"id": f"a{i}", "path": f"img/a{i}.png", "role": "adapter", "prompt": p, "has_trigger": False, **common})
    # trigger images: the subject's own reference views (a perfect adapter)
    for i in range(5):
        src = WORLD_DIR / "subjects" / "purple-circle" / f"ref_{i}.png"
        shutil.copy(src, tmp_path / "img" / f"t{i}.png")
        rows.append({"id": f"t{i}", "path": f"img/t{i}.png", "role": "adapter", "subject": "purple-circle",
                     "prompt": "a sks circle", "prompt_without_trigger": "a circle", "has_trigger": True,
                     "seed": i, "prompt_index": 0})
    (tmp_path / "images.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "results.json").write_text(json.dumps({"metrics": {}, "overall": {},
                                                       "provenance": {"base_model": {"spec": "builtin:shapes-world"}}}))
    gt = truth(tmp_path)
    s = gt["subjects"]["purple-circle"]
    assert s["true_knowledge_shift"] == 0.0
    assert s["true_leakage"] == s["base_signature_rate"]  # identical images: no leakage beyond the base's
    assert s["true_identity"] == 1.0 and s["trigger_shape_rate"] == 1.0
    assert s["true_diversity_ratio"] == 1.0  # identical images: the base's diversity
    assert gt["probe"] == "builtin:shapes-world/probe"  # not this machine's path
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["ground_truth"]["subjects"]["purple-circle"]["true_knowledge_shift"] == 0.0
    assert "metrics" in res
    del torch


def test_true_diversity_ratio_is_hand_computed():
    import math

    from kps_bench.world.truth import class_diversity, diversity_ratio, normalised_entropy

    def lbl(colour, pattern="plain", background="white", size="small"):
        return {"shape": "star", "colour": colour, "pattern": pattern, "background": background, "size": size}

    assert normalised_entropy(["a", "a", "b", "b"], 4) == pytest.approx(0.5)
    base = [lbl("red"), lbl("blue", "striped", "black", "large")]
    expected = (math.log(2) / math.log(11) + math.log(2) / math.log(4) + math.log(2) / math.log(5)
                + math.log(2) / math.log(3)) / 4
    assert class_diversity(base) == pytest.approx(expected)
    colours_only = [lbl("red"), lbl("blue")]  # only the colour varies
    assert diversity_ratio({"p": colours_only}, {"p": base}) == pytest.approx(math.log(2) / math.log(11) / 4 / expected)
    assert diversity_ratio({"p": [lbl("red")] * 2}, {"p": base}) == 0.0  # collapsed
    # a prompt whose base images all look alike is left out; none left -> None
    assert diversity_ratio({"p": base, "q": base}, {"p": base, "q": [lbl("red")] * 2}) == pytest.approx(1.0)
    assert diversity_ratio({"q": base}, {"q": [lbl("red")] * 2}) is None
