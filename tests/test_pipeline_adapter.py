"""A fine-tuned (DreamBooth) pipeline adapter replaces the base pipeline instead of sitting next to it."""

import gc
import json
import shutil
import weakref

import pytest
import torch
from diffusers import UNet2DConditionModel

from kps_bench.models import apply_adapter, load_pipeline, resolve_adapter
from kps_bench.protocol import load_protocol
from kps_bench.run import RunOptions, run_benchmark


@pytest.fixture(scope="module")
def tuned(tiny, tmp_path_factory):
    """The tiny pipeline with its UNet changed, as DreamBooth leaves it (VAE, text encoder, tokenizer unchanged)."""
    out = tmp_path_factory.mktemp("tuned") / "pipeline"
    shutil.copytree(tiny / "pipeline", out)
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    with torch.no_grad():
        unet.conv_in.weight.mul_(1.5)
    unet.save_pretrained(out / "unet")
    return out


def test_the_base_is_released_before_the_fine_tuned_pipeline_is_used(tiny, tuned):
    base = load_pipeline(str(tiny / "pipeline"), str(tiny / "pipeline"), "cpu", "float32", "ddim")
    base_unet = weakref.ref(base.pipe.unet)
    vae, text_encoder = base.pipe.vae, base.pipe.text_encoder
    pipe = apply_adapter(base, resolve_adapter(str(tuned), "pipeline", False), ["sks"], "cpu", "float32", "ddim")
    gc.collect()
    assert base.pipe is None and base_unet() is None  # the base's UNet is gone: one UNet in memory, not two
    assert pipe.vae is vae and pipe.text_encoder is text_encoder  # unchanged components are shared, not loaded again
    tuned_unet = UNet2DConditionModel.from_pretrained(tuned / "unet")
    assert torch.equal(pipe.unet.conv_in.weight, tuned_unet.conv_in.weight)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_a_run_with_a_fine_tuned_pipeline(tiny, tiny_protocol, tuned, tmp_path):
    res = run_benchmark(load_protocol(str(tiny_protocol), ["prompts=['a {subject}']"]),
                        RunOptions(out=tmp_path, adapter=str(tuned), subjects=("red-block",), device="cpu",
                                   cache_dir=tmp_path / "cache"))
    assert res["provenance"]["adapter"]["kind"] == "pipeline"
    assert res["provenance"]["images_made"] == {"base": 4, "adapter": 4}
    rows = [json.loads(line) for line in (tmp_path / "images.jsonl").read_text().splitlines()]
    free = {(r["role"], r["seed"]): r["sha256"] for r in rows if r["role"] != "reference" and not r["has_trigger"]}
    # the changed UNet draws other trigger-free images than the base
    assert all(free[("adapter", seed)] != free[("base", seed)] for _, seed in free)
    assert res["metrics"]["red-block"]["preservation"]["value"] < 1.0
