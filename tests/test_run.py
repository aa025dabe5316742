"""End-to-end `run` and `score` on tiny local models, the run-directory format, and the identical-model properties."""

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from kps_bench.cli import main
from kps_bench.protocol import load_protocol
from kps_bench.run import RunOptions, recompute, run_benchmark, score_manifest

def same(a, b) -> bool:
    """Equal results, NaN equal to NaN (the tiny models leave some chance-corrected scores undefined)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


ALL_RECORD_FIELDS = {"id", "path", "role", "subject", "prompt", "prompt_without_trigger", "has_trigger", "seed"}


@pytest.fixture(scope="module")
def lora_run(tiny, tiny_protocol, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run")
    results = run_benchmark(load_protocol(str(tiny_protocol)),
                            RunOptions(out=out, adapter=str(tiny / "lora"), subjects=("red-block",), device="cpu"))
    return out, results


def test_run_directory_format(lora_run):
    out, results = lora_run
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert all(ALL_RECORD_FIELDS <= set(r) for r in rows)
    roles = [r["role"] for r in rows]
    # 4 references; 2 prompts x 2 images: base (free, trigger), adapter (free, trigger)
    assert roles.count("reference") == 4 and roles.count("base") == 8 and roles.count("adapter") == 8
    base_trigger = {r["seed"]: r for r in rows if r["role"] == "base" and r["has_trigger"]}
    adapter_trigger = [r for r in rows if r["role"] == "adapter" and r["has_trigger"]]
    assert len(base_trigger) == 4 and all(base_trigger[r["seed"]]["prompt"] == r["prompt"] for r in adapter_trigger)
    for r in rows:
        assert (out / r["path"]).is_file()
        if r["role"] == "adapter" and r["has_trigger"]:
            assert r["prompt"].startswith("a photo of a sks block") or "sks block" in r["prompt"]
            assert "sks" not in r["prompt_without_trigger"]
    emb = load_file(str(out / "embeddings.safetensors"))
    for r in rows:
        for kind in ("clip", "dino"):
            e = emb[f"{kind}/{r['id']}"]
            assert e.dtype == torch.float32 and abs(float(e.norm()) - 1) < 1e-5
    assert {"clip_text/red-block/0", "clip_text/red-block/1"} <= set(emb)
    prov = results["provenance"]
    assert results["kps_version"] == "2" and len(prov["protocol_sha256"]) == 64
    assert prov["adapter"]["kind"] == "lora" and len(prov["adapter"]["files"]["pytorch_lora_weights.safetensors"]) == 64
    assert len(prov["base_model"]["sha256"]) == 64
    for key in ("packages", "device", "timings_s", "start_time", "end_time", "seeds", "batch_size", "encoders"):
        assert key in prov
    assert prov["dtype"] == "float32"  # the dtype of the loaded weights
    for name in ("torch", "diffusers", "transformers", "open_clip_torch", "peft", "kps-bench"):
        assert prov["packages"][name]
    assert prov["encoders"]["clip"]["weights_sha256"]
    m = results["metrics"]["red-block"]
    for name in ("kps", "identity", "preservation", "clip_i", "clip_t", "dino", "diversity_ratio", "vendi_ratio",
                 "kps_gain", "identity_gain", "identity_base", "identity_ceiling", "preservation_gain",
                 "preservation_floor"):
        assert set(m[name]) == {"value", "ci_low", "ci_high", "n", "flagged"}
        if not math.isnan(m[name]["value"]):  # the tiny CLIP sees two seeds of a prompt as one: no preservation_gain
            assert m[name]["ci_low"] <= m[name]["value"] + 1e-12 and m[name]["value"] <= m[name]["ci_high"] + 1e-12
    # the random LoRA changes the trigger-free images: preservation strictly below 1
    assert m["preservation"]["value"] < 1.0


def test_metrics_recompute_from_manifest_and_embeddings(lora_run):
    out, results = lora_run
    again = recompute(out)
    assert same(again["metrics"], results["metrics"])
    assert same(again["overall"], results["overall"])


def test_rerun_reuses_every_image(lora_run, tiny, tiny_protocol):
    out, results = lora_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    again = run_benchmark(load_protocol(str(tiny_protocol)),
                          RunOptions(out=out, adapter=str(tiny / "lora"), subjects=("red-block",), device="cpu"))
    assert again["provenance"]["images_made"] == {"base": 0}
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == before
    assert same(again["metrics"], results["metrics"])


@pytest.mark.parametrize("kind", ["pipeline", "none"])
def test_base_as_its_own_adapter(tiny, tiny_protocol, tmp_path, kind):
    adapter = str(tiny / "pipeline") if kind == "pipeline" else None
    res = run_benchmark(load_protocol(str(tiny_protocol), ["prompts=['a {subject}']"]),
                        RunOptions(out=tmp_path, adapter=adapter, adapter_kind=kind, subjects=("red-block",),
                                   device="cpu"))
    m = res["metrics"]["red-block"]
    assert m["preservation"]["value"] == 1.0
    assert m["diversity_ratio"]["value"] == 1.0
    assert m["identity"]["value"] == m["identity_base"]["value"] < m["identity_ceiling"]["value"] - 0.01
    assert m["identity_gain"]["value"] == 0.0 and m["kps_gain"]["value"] == 0.0
    assert res["overall"]["kps_gain"]["value"] == 0.0
    # the tiny random CLIP sees two seeds of a prompt as nearly one image: preservation_gain is undefined (its
    # denominator 1 - preservation_floor is below 0.01), and kps_gain is 0 all the same (no identity gain)
    assert m["preservation_floor"]["value"] > 0.99 and math.isnan(m["preservation_gain"]["value"])


def test_textual_inversion_adapter(tiny, tiny_protocol, tmp_path):
    res = run_benchmark(load_protocol(str(tiny_protocol), ["prompts=['a {subject}']"]),
                        RunOptions(out=tmp_path, adapter=str(tiny / "textual-inversion"), subjects=("red-block",),
                                   device="cpu"))
    assert res["provenance"]["adapter"]["kind"] == "textual-inversion"
    # trigger-free prompts never contain the new token: the adapter's free images are the base's
    assert res["metrics"]["red-block"]["preservation"]["value"] == 1.0
    # ... but the trigger prompts are drawn with the learned embedding: not what the base draws for them
    base = run_benchmark(load_protocol(str(tiny_protocol), ["prompts=['a {subject}']"]),
                         RunOptions(out=tmp_path / "base", adapter=str(tiny / "pipeline"), adapter_kind="pipeline",
                                    subjects=("red-block",), device="cpu"))
    assert base["metrics"]["red-block"]["preservation"]["value"] == 1.0

    def trigger_images(run_dir):
        rows = [json.loads(line) for line in (run_dir / "images.jsonl").read_text().splitlines()]
        return {r["seed"]: (run_dir / r["path"]).read_bytes() for r in rows if r["has_trigger"]}

    ti, plain = trigger_images(tmp_path), trigger_images(tmp_path / "base")
    assert ti.keys() == plain.keys() and len(ti) == 2 and all(ti[s] != plain[s] for s in ti)


def test_score_existing_images_matches_run(lora_run, tiny_protocol, tmp_path):
    out, results = lora_run
    manifest = tmp_path / "made-elsewhere" / "images.jsonl"
    shutil.copytree(out / "images", manifest.parent / "images")
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    # another tool's manifest: no references (they come from the protocol), minimal fields, no prompt_index
    keep = ("id", "path", "role", "subject", "prompt", "prompt_without_trigger", "has_trigger", "seed")
    manifest.write_text("\n".join(json.dumps({k: r[k] for k in keep}) for r in rows if r["role"] != "reference"))
    scored = score_manifest(load_protocol(str(tiny_protocol)), manifest, tmp_path / "scored", "cpu")
    for name in ("kps", "identity", "preservation", "clip_i", "clip_t", "dino", "diversity_ratio"):
        assert scored["metrics"]["red-block"][name]["value"] == pytest.approx(
            results["metrics"]["red-block"][name]["value"], abs=1e-12)
    assert same(recompute(tmp_path / "scored")["metrics"], scored["metrics"])


def test_the_loaded_dtype_is_the_requested_one(tiny):
    """diffusers >= 0.40 honours from_pretrained(dtype=...); LoadedModel.dtype (what provenance records) reads the weights."""
    from kps_bench.models import load_pipeline

    loaded = load_pipeline("pipeline", str(tiny / "pipeline"), "cpu", "bfloat16", "ddim")
    assert loaded.dtype == "bfloat16" and loaded.pipe.unet.dtype == torch.bfloat16
    assert loaded.pipe.text_encoder.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- issue 17


def _to_pickle(folder):
    """transformers saves safetensors whatever it is told: rewrite them as pytorch_model.bin."""
    for f in folder.rglob("*.safetensors"):
        torch.save(load_file(str(f)), f.with_name("pytorch_model.bin"))
        f.unlink()
    assert list(folder.rglob("*.bin"))


def test_allow_unsafe_pickle_works_for_every_weight_file(tiny, tmp_path):
    """Base pipeline, LoRA, textual inversion, CLIP and DINO saved as pickle load with the flag (and match their
    safetensors twins), and are refused without it."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from transformers import ViTModel

    from kps_bench.encoders import ClipEncoder, DinoEncoder
    from kps_bench.errors import UserError
    from kps_bench.models import apply_adapter, count_lora_layers, load_pipeline, resolve_adapter

    StableDiffusionPipeline.from_pretrained(tiny / "pipeline").save_pretrained(tmp_path / "base",
                                                                              safe_serialization=False)
    _to_pickle(tmp_path / "base")
    with pytest.raises(UserError, match="--allow-unsafe-pickle"):
        load_pipeline("b", str(tmp_path / "base"), "cpu", "float32", "ddim")
    base = load_pipeline("b", str(tmp_path / "base"), "cpu", "float32", "ddim", allow_unsafe_pickle=True)

    for kind, folder, name in (("lora", "lora", "pytorch_lora_weights"), ("ti", "textual-inversion", "learned_embeds")):
        (tmp_path / kind).mkdir()
        torch.save(load_file(str(tiny / folder / f"{name}.safetensors")), tmp_path / kind / f"{name}.bin")
        with pytest.raises(UserError, match="--allow-unsafe-pickle"):
            resolve_adapter(str(tmp_path / kind), "auto", False)
    lora = resolve_adapter(str(tmp_path / "lora"), "auto", True)
    pipe = apply_adapter(base, lora, ["sks"], "cpu", "float32", "ddim", allow_unsafe_pickle=True)
    assert lora.kind == "lora" and count_lora_layers(pipe) == 32
    base = load_pipeline("b", str(tmp_path / "base"), "cpu", "float32", "ddim", allow_unsafe_pickle=True)
    ti = resolve_adapter(str(tmp_path / "ti"), "auto", True)
    pipe = apply_adapter(base, ti, ["sks"], "cpu", "float32", "ddim", allow_unsafe_pickle=True)
    token = pipe.tokenizer.convert_tokens_to_ids("sks")
    expected = load_file(str(tiny / "textual-inversion" / "learned_embeds.safetensors"))["sks"]
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token], expected.flatten())

    images = [Image.new("RGB", (32, 32), c) for c in ("red", "navy")]
    torch.save(load_file(str(tiny / "clip" / "open_clip_model.safetensors")), tmp_path / "clip.bin")
    config = str(tiny / "clip" / "open_clip_config.json")
    with pytest.raises(UserError, match="--allow-unsafe-pickle"):
        ClipEncoder(config, str(tmp_path / "clip.bin"))
    clip_bin = ClipEncoder(config, str(tmp_path / "clip.bin"), allow_unsafe_pickle=True)
    clip_safe = ClipEncoder(config, str(tiny / "clip" / "open_clip_model.safetensors"))
    assert torch.equal(clip_bin.encode_images(images), clip_safe.encode_images(images))

    ViTModel.from_pretrained(tiny / "dino", add_pooling_layer=False).save_pretrained(tmp_path / "dino",
                                                                                   safe_serialization=False)
    shutil.copy(tiny / "dino" / "preprocessor_config.json", tmp_path / "dino")
    _to_pickle(tmp_path / "dino")
    with pytest.raises(UserError, match="--allow-unsafe-pickle"):
        DinoEncoder(str(tmp_path / "dino"))
    dino_bin = DinoEncoder(str(tmp_path / "dino"), allow_unsafe_pickle=True)
    assert torch.equal(dino_bin.encode_images(images), DinoEncoder(str(tiny / "dino")).encode_images(images))


def test_cli_run_with_a_pickle_lora_file_and_allow_unsafe_pickle(lora_run, tiny, tiny_protocol, tmp_path):
    """`run --allow-unsafe-pickle` takes a LoRA given as a .bin file, and makes the safetensors LoRA's images."""
    lora = tmp_path / "pytorch_lora_weights.bin"
    torch.save(load_file(str(tiny / "lora" / "pytorch_lora_weights.safetensors")), lora)
    r = CliRunner().invoke(main, ["run", "--protocol", str(tiny_protocol), "--adapter", str(lora), "--subject",
                                  "red-block", "--out", str(tmp_path / "run"), "--device", "cpu",
                                  "--allow-unsafe-pickle"])
    assert r.exit_code == 0, r.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "ok" and results["provenance"]["adapter"]["kind"] == "lora"
    assert results["provenance"]["images_made"]["adapter"] == 8

    def adapter_images(run):
        return {r["id"]: r["sha256"] for line in (run / "images.jsonl").read_text().splitlines()
                if (r := json.loads(line))["role"] == "adapter"}

    assert len(adapter_images(tmp_path / "run")) == 8
    assert adapter_images(tmp_path / "run") == adapter_images(lora_run[0])


def test_a_hub_id_missing_from_the_cache_fails_at_once_when_offline(tiny_protocol, tmp_path):
    """With HF_HUB_OFFLINE=1, a base model that is neither a local folder nor in the hub cache is a clear error
    before any image, and leaves no run folder."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    r = subprocess.run([sys.executable, "-m", "kps_bench", "run", "--protocol", str(tiny_protocol), "--base",
                        "nobody/no-such-model", "--adapter-kind", "none", "--subject", "red-block", "--out",
                        str(tmp_path / "run"), "--device", "cpu"], env=env, capture_output=True, text=True,
                       timeout=300)
    output = " ".join((r.stdout + r.stderr).split())  # rich wraps lines
    assert r.returncode == 2, output
    assert ("Cannot load base model 'nobody/no-such-model': it is not a local folder and not reachable on the hub "
            "(HF_HUB_OFFLINE is set and the hub cache has no copy). Check the id, or download it and pass the "
            "folder.") in output
    assert "Traceback" not in output and not (tmp_path / "run").exists()


def _scored_without_base(lora_run, tmp_path, label):
    """The LoRA run's adapter images alone in a manifest: no base image, so preservation (and kps) is undefined."""
    out, _ = lora_run
    manifest = tmp_path / "m" / "images.jsonl"
    shutil.copytree(out / "images", manifest.parent / "images")
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    manifest.write_text("\n".join(json.dumps(r) for r in rows if r["role"] == "adapter"))
    return manifest


def test_undefined_kps_is_nan_and_ranked_last(lora_run, tiny_protocol, tmp_path):
    from kps_bench.leaderboard import build_tables, load_run, render

    out, _ = lora_run
    manifest = _scored_without_base(lora_run, tmp_path, "no-base")
    r = CliRunner().invoke(main, ["score", "--manifest", str(manifest), "--protocol", str(tiny_protocol), "--out",
                                  str(tmp_path / "no-base"), "--device", "cpu", "--label", "adapter-alone"])
    assert r.exit_code == 0, r.output
    warning = " ".join(r.output.split())
    assert "warning: diversity_base, diversity_ratio, identity_base, identity_gain, kps, kps_gain, preservation, " \
           "preservation_floor, preservation_gain, vendi_base, vendi_ratio could not be computed (NaN)" in warning and "the leaderboard ranks such runs last" in warning
    res = json.loads((tmp_path / "no-base" / "results.json").read_text())
    m = res["metrics"]["red-block"]
    assert m["preservation"]["n"] == 0 and math.isnan(m["preservation"]["value"]) and math.isnan(m["kps"]["value"])
    assert math.isnan(m["kps"]["ci_low"]) and math.isnan(res["overall"]["kps"]["value"])
    assert m["identity"]["value"] == pytest.approx(lora_run[1]["metrics"]["red-block"]["identity"]["value"], abs=1e-12)
    assert res["provenance"]["label"] == "adapter-alone"
    (table,) = build_tables([load_run(tmp_path / "no-base"), load_run(out)], resamples=50)
    assert [(row["name"], row["rank"]) for row in table.rows] == [("lora", 1), ("adapter-alone", None)]
    md = render([table], "md").splitlines()
    assert md[2].startswith("| 1 | lora |") and md[3].startswith("| — | adapter-alone | nan [nan, nan] |")


def test_more_than_half_flagged_fails_the_run_but_writes_its_results(tiny, tiny_protocol, tmp_path):
    r = CliRunner().invoke(main, ["run", "--protocol", str(tiny_protocol), "--adapter", str(tiny / "lora"),
                                  "--subject", "red-block", "--out", str(tmp_path), "--device", "cpu",
                                  "--set", "generation.guidance_scale=3.0e+38"])
    assert r.exit_code == 2, r.output
    assert "Error: 8 of 8 adapter images are NaN or all black" in r.output and "marked as failed" in r.output
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "failed" and res["counts"]["flagged"] == 16 and "8 of 8 adapter" in res["failure"]
    board = CliRunner().invoke(main, ["leaderboard", str(tmp_path)])
    assert board.exit_code == 2 and "is marked as failed" in board.output


def test_corrupt_cached_image_and_stale_temporaries_are_replaced(lora_run, tiny, tiny_protocol, tmp_path):
    out, results = lora_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    victim = sorted((run / "images").glob("*.png"))[0]
    good = victim.read_bytes()
    victim.write_bytes(b"")  # emptied by a crash or a full disk
    stale = run / "images" / f".{victim.name}.k1ll3d.tmp.png"
    stale.write_bytes(good[:100])
    r = CliRunner().invoke(main, ["run", "--protocol", str(tiny_protocol), "--adapter", str(tiny / "lora"),
                                  "--subject", "red-block", "--out", str(run), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "is corrupt (0 bytes); making it again" in " ".join(r.output.split())
    assert victim.read_bytes() == good and not stale.exists()
    assert same(json.loads((run / "results.json").read_text())["metrics"], results["metrics"])


def test_an_interrupted_rescore_is_detected(lora_run, tmp_path):
    """Killed between writing images.jsonl and results.json: the folder no longer matches its results."""
    from kps_bench.errors import UserError
    from kps_bench.leaderboard import load_run

    out, _ = lora_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    lines = (run / "images.jsonl").read_text().splitlines()
    (run / "images.jsonl").write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    for reader in (load_run, recompute):
        with pytest.raises(UserError, match="is inconsistent: its images.jsonl is not the one its results.json"):
            reader(run)


# ----------------------------------------------------------------------------- issue 14


def _manifest_of(lora_run, tmp_path, edit=lambda rows: rows):
    """The LoRA run's generated images in a manifest of another tool (no references), after ``edit``."""
    out, _ = lora_run
    manifest = tmp_path / "m" / "images.jsonl"
    shutil.copytree(out / "images", manifest.parent / "images")
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    manifest.write_text("\n".join(json.dumps(r) for r in edit([r for r in rows if r["role"] != "reference"])))
    return manifest


def test_score_refuses_null_and_repeated_seeds_naming_the_rows(lora_run, tiny_protocol, tmp_path):
    def edit(rows):
        free = [r for r in rows if r["role"] == "base" and not r["has_trigger"] and r["prompt_index"] == 0]
        free[1]["seed"] = free[0]["seed"]
        rows[-1]["seed"] = None
        return rows

    manifest = _manifest_of(lora_run, tmp_path, edit)
    r = CliRunner().invoke(main, ["score", "--manifest", str(manifest), "--protocol", str(tiny_protocol), "--out",
                                  str(tmp_path / "scored"), "--device", "cpu"])
    text = " ".join(r.output.split())
    assert r.exit_code == 2, r.output
    assert "'red-block:adapter:trigger:p1:k1' has no seed" in text
    assert ("is repeated by 'red-block:base:free:p0:k0', 'red-block:base:free:p0:k1' (base, trigger-free prompt 0 "
            "of subject 'red-block')") in text
    assert not (tmp_path / "scored" / "results.json").exists()


def test_a_protocol_without_dino_metrics_scores_without_dino(lora_run, tiny_protocol, tmp_path):
    """`metrics: [kps, identity, preservation]` loads no DINO encoder, stores no DINO embedding, and computes exactly
    the metrics those enable, equal to the full protocol's."""
    manifest = _manifest_of(lora_run, tmp_path)
    protocol = load_protocol(str(tiny_protocol), ["metrics=[kps, identity, preservation]"])
    res = score_manifest(protocol, manifest, tmp_path / "scored", "cpu")
    assert set(res["provenance"]["encoders"]) == {"clip"}
    assert not any(k.startswith("dino/") for k in load_file(str(tmp_path / "scored" / "embeddings.safetensors")))
    m, full = res["metrics"]["red-block"], lora_run[1]["metrics"]["red-block"]
    assert set(m) - {"n_prompts"} == {"kps", "kps_gain", "identity", "identity_base", "identity_ceiling",
                                      "identity_gain", "preservation", "preservation_floor", "preservation_gain"}
    for name in ("kps", "kps_gain", "identity_gain", "preservation_gain"):
        assert m[name]["value"] == pytest.approx(full[name]["value"], abs=1e-12, nan_ok=True)
    assert same(recompute(tmp_path / "scored")["metrics"], res["metrics"])
