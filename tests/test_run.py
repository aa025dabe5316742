"""End-to-end `run` and `score` on tiny local models, the run-directory format, and the identical-model properties."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from kps_bench.cli import main
from kps_bench.protocol import load_protocol
from kps_bench.run import RunOptions, recompute, run_benchmark, score_manifest

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
    # 4 references; 2 prompts x 2 images: base (free), adapter (free), adapter (trigger)
    assert roles.count("reference") == 4 and roles.count("base") == 4 and roles.count("adapter") == 8
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
    assert results["kps_version"] == "1" and len(prov["protocol_sha256"]) == 64
    assert prov["adapter"]["kind"] == "lora" and len(prov["adapter"]["files"]["pytorch_lora_weights.safetensors"]) == 64
    assert len(prov["base_model"]["sha256"]) == 64
    for key in ("packages", "device", "timings_s", "start_time", "end_time", "seeds", "batch_size", "encoders"):
        assert key in prov
    assert prov["dtype"] == "float32"  # the dtype of the loaded weights
    for name in ("torch", "diffusers", "transformers", "open_clip_torch", "peft", "kps-bench"):
        assert prov["packages"][name]
    assert prov["encoders"]["clip"]["weights_sha256"]
    m = results["metrics"]["red-block"]
    for name in ("kps", "identity", "preservation", "clip_i", "clip_t", "dino", "diversity_ratio", "vendi_ratio"):
        assert set(m[name]) == {"value", "ci_low", "ci_high", "n"}
        assert m[name]["ci_low"] <= m[name]["value"] + 1e-12 and m[name]["value"] <= m[name]["ci_high"] + 1e-12
    # the random LoRA changes the trigger-free images: preservation strictly below 1
    assert m["preservation"]["value"] < 1.0


def test_metrics_recompute_from_manifest_and_embeddings(lora_run):
    out, results = lora_run
    again = recompute(out)
    assert again["metrics"] == results["metrics"]
    assert again["overall"] == results["overall"]


def test_rerun_reuses_every_image(lora_run, tiny, tiny_protocol):
    out, results = lora_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    again = run_benchmark(load_protocol(str(tiny_protocol)),
                          RunOptions(out=out, adapter=str(tiny / "lora"), subjects=("red-block",), device="cpu"))
    assert again["provenance"]["images_made"] == {"base": 0}
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == before
    assert again["metrics"] == results["metrics"]


@pytest.mark.parametrize("kind", ["pipeline", "none"])
def test_base_as_its_own_adapter(tiny, tiny_protocol, tmp_path, kind):
    adapter = str(tiny / "pipeline") if kind == "pipeline" else None
    res = run_benchmark(load_protocol(str(tiny_protocol), ["prompts=['a {subject}']"]),
                        RunOptions(out=tmp_path, adapter=adapter, adapter_kind=kind, subjects=("red-block",),
                                   device="cpu"))
    m = res["metrics"]["red-block"]
    assert m["preservation"]["value"] == 1.0
    assert m["diversity_ratio"]["value"] == 1.0


def test_textual_inversion_adapter(tiny, tiny_protocol, tmp_path):
    res = run_benchmark(load_protocol(str(tiny_protocol), ["prompts=['a {subject}']"]),
                        RunOptions(out=tmp_path, adapter=str(tiny / "textual-inversion"), subjects=("red-block",),
                                   device="cpu"))
    assert res["provenance"]["adapter"]["kind"] == "textual-inversion"
    # trigger-free prompts never contain the new token: the adapter's free images are the base's
    assert res["metrics"]["red-block"]["preservation"]["value"] == 1.0


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
    assert recompute(tmp_path / "scored")["metrics"] == scored["metrics"]


def test_the_loaded_dtype_is_the_requested_one(tiny):
    """diffusers >= 0.40 honours from_pretrained(dtype=...); LoadedModel.dtype (what provenance records) reads the weights."""
    from kps_bench.models import load_pipeline

    loaded = load_pipeline("pipeline", str(tiny / "pipeline"), "cpu", "bfloat16", "ddim")
    assert loaded.dtype == "bfloat16" and loaded.pipe.unet.dtype == torch.bfloat16
    assert loaded.pipe.text_encoder.dtype == torch.bfloat16
