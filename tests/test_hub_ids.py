"""Hub ids go through the same loading code as local folders: checked offline against a local hub cache."""

import json
import os
import shutil
import subprocess
import sys

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root, repo_id, folder):
    """Lay ``folder`` out as the huggingface_hub cache does for ``repo_id`` at revision COMMIT."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


def test_pipeline_and_dino_load_by_hub_id_and_record_the_revision(tiny, tmp_path):
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "kps-test/tiny-sd", tiny / "pipeline")
    fake_hub_cache(cache, "kps-test/tiny-dino", tiny / "dino")
    code = (
        "import json; from kps_bench.models import load_pipeline; from kps_bench.encoders import DinoEncoder\n"
        "from PIL import Image\n"
        "m = load_pipeline('kps-test/tiny-sd', 'kps-test/tiny-sd', 'cpu', 'float32', 'euler')\n"
        "d = DinoEncoder('kps-test/tiny-dino')\n"
        "e = d.encode_images([Image.new('RGB', (32, 32), 'red')])\n"
        "print(json.dumps({'identity': m.identity, 'scheduler': type(m.pipe.scheduler).__name__,"
        " 'dino': d.identity, 'shape': list(e.shape)}))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["identity"] == {"spec": "kps-test/tiny-sd", "hub_id": "kps-test/tiny-sd", "revision": COMMIT,
                               "pipeline_class": "StableDiffusionPipeline"}
    assert got["scheduler"] == "EulerDiscreteScheduler"
    assert got["dino"]["model"] == "kps-test/tiny-dino" and got["shape"] == [1, 32]


def test_unreachable_hub_id_is_a_user_error(tmp_path):
    code = ("from kps_bench.models import load_pipeline\n"
            "load_pipeline('nobody/no-such-model', 'nobody/no-such-model', 'cpu', 'float32', 'ddim')\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "UserError" in out.stderr and "Cannot load base model 'nobody/no-such-model'" in out.stderr


def test_dino_folder_with_or_without_a_pooler_loads_to_the_same_features(tiny, tmp_path):
    """A ViT saved by ``ViTModel`` (with its unused pooler, as the shapes world ships it) and one saved without
    (like facebook/dino-vits16) both load with exactly the checkpoint's weights and give the same CLS features."""
    import torch
    from PIL import Image
    from transformers import ViTModel

    from kps_bench.encoders import DinoEncoder

    bare = DinoEncoder(str(tiny / "dino"))
    full = ViTModel.from_pretrained(tiny / "dino", add_pooling_layer=True)  # the pooler is freshly initialised
    full.save_pretrained(tmp_path / "dino")
    shutil.copy(tiny / "dino" / "preprocessor_config.json", tmp_path / "dino")
    pooled = DinoEncoder(str(tmp_path / "dino"))
    assert bare.model.pooler is None and pooled.model.pooler is not None
    assert torch.equal(pooled.model.pooler.dense.weight, full.pooler.dense.weight)
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "navy", "white")]
    assert torch.equal(bare.encode_images(images), pooled.encode_images(images))


def test_dino_folder_without_preprocessor_config_gets_dinos_standard_preprocessing(tmp_path, capsys):
    """``ViTModel.save_pretrained`` alone writes no preprocessor_config.json: the folder loads with DINO's standard
    preprocessing (224 px bilinear resize, ImageNet mean/std), says so, records it, and gives exactly the features
    of the same folder with facebook/dino-vits16's own preprocessor_config.json."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import ViTConfig, ViTModel

    from kps_bench.encoders import DinoEncoder

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=224, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64), add_pooling_layer=False).save_pretrained(tmp_path / "bare")
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["config.json", "model.safetensors"]
    bare = DinoEncoder(str(tmp_path / "bare"))
    warning = " ".join(capsys.readouterr().err.split())  # rich wraps lines
    assert "has no preprocessor_config.json; using DINO's standard preprocessing (224 px" in warning
    assert bare.identity["preprocessing"] == {"source": "DINO standard (no preprocessor_config.json)", "size": 224,
                                              "resample": "bilinear", "mean": [0.485, 0.456, 0.406],
                                              "std": [0.229, 0.224, 0.225]}
    shutil.copytree(tmp_path / "bare", tmp_path / "hub-style")
    (tmp_path / "hub-style" / "preprocessor_config.json").write_text(json.dumps({  # as facebook/dino-vits16 has it
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 2, "size": 224}))
    configured = DinoEncoder(str(tmp_path / "hub-style"))
    assert configured.identity["preprocessing"] == {"source": "preprocessor_config.json"}
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((64, 48), (300, 300))]
    feats = bare.encode_images(images)
    assert feats.shape == (2, 32) and torch.equal(feats, configured.encode_images(images))
    # by hand: bilinear resize to 224, scale to [0, 1], ImageNet normalisation, CLS token
    x = torch.stack([torch.from_numpy(np.asarray(im.resize((224, 224), Image.BILINEAR), dtype=np.float32) / 255)
                     .permute(2, 0, 1) for im in images])
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.inference_mode():
        cls = bare.model(pixel_values=x).last_hidden_state[:, 0]
    assert torch.allclose(feats, cls / cls.norm(dim=-1, keepdim=True), atol=1e-4)
