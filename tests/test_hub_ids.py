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
    assert got["identity"] == {"spec": "kps-test/tiny-sd", "hub_id": "kps-test/tiny-sd", "revision": COMMIT}
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
