"""Ground-truth probe: a small CNN that reads the factors (shape, colour, pattern, pattern colour, background, size)
of a 32x32 shapes-world image. It is the yardstick of what an image really shows, not a metric.

Saved as ``probe/config.json`` + ``probe/model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .render import BACKGROUNDS, COLOURS, PATTERN_COLOURS, PATTERNS, SHAPES, SIZES

HEADS = {"shape": SHAPES, "colour": COLOURS, "pattern": PATTERNS, "pattern_colour": PATTERN_COLOURS,
         "background": BACKGROUNDS, "size": SIZES}


def build_probe(width: int = 32):
    import torch
    from torch import nn

    def block(i, o):
        return nn.Sequential(
            nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
            nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True),
        )

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            w = width
            self.features = nn.Sequential(
                block(3, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2), block(2 * w, 4 * w),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )
            self.heads = nn.ModuleDict({k: nn.Linear(4 * w, len(v)) for k, v in HEADS.items()})

        def forward(self, x):  # x: float in [0,1], (B,3,32,32)
            h = self.features(x * 2 - 1)
            return {k: head(h) for k, head in self.heads.items()}

    torch.manual_seed(0)
    return Probe()


def save_probe(model, out_dir, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().half().contiguous() if v.is_floating_point() else v.contiguous()
          for k, v in model.state_dict().items()}
    save_file(sd, str(out / "model.safetensors"))
    cfg = {"architecture": "kps_bench.world.probe.Probe", "width": 32, "input": "RGB 32x32 in [0,1]",
           "heads": HEADS}
    cfg.update(extra or {})
    (out / "config.json").write_text(json.dumps(cfg, indent=1))


_CACHE: dict = {}


def load_probe(probe_dir=None):
    """Load the probe (cached). ``probe_dir`` defaults to the shipped world's ``probe/``."""
    import torch
    from safetensors.torch import load_file

    from . import WORLD_DIR

    d = Path(probe_dir) if probe_dir else WORLD_DIR / "probe"
    key = str(d.resolve())
    if key not in _CACHE:
        cfg = json.loads((d / "config.json").read_text())
        m = build_probe(cfg.get("width", 32))
        sd = load_file(str(d / "model.safetensors"))
        m.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
        m.eval()
        _CACHE[key] = m
    return _CACHE[key]


def _to_tensor(images):
    import numpy as np
    import torch

    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.max() > 1.5:
            x = x / 255.0
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        return x
    arrs = []
    for im in images:
        if not isinstance(im, np.ndarray):
            from PIL import Image

            im = np.asarray(im.convert("RGB").resize((32, 32), Image.BICUBIC) if im.size != (32, 32)
                            else im.convert("RGB"))
        arrs.append(im)
    a = np.stack(arrs).astype(np.float32) / 255.0
    return torch.from_numpy(a).permute(0, 3, 1, 2)


def predict(images, probe_dir=None, batch_size: int = 256) -> list[dict]:
    """Probe labels for images (PIL images, uint8 HxWx3 arrays, or a tensor).

    Returns one dict per image: ``{"shape": "star", "colour": "red", "pattern": "checkered",
    "pattern_colour": "black", "background": "white", "size": "large"}``.
    """
    import torch

    m = load_probe(probe_dir)
    x = _to_tensor(images)
    out: list[dict] = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits = m(x[i : i + batch_size])
            idx = {k: v.argmax(1).tolist() for k, v in logits.items()}
            for j in range(len(idx["shape"])):
                out.append({k: HEADS[k][idx[k][j]] for k in HEADS})
    return out


def predict_files(paths, probe_dir=None) -> list[dict]:
    from PIL import Image

    ims = []
    for p in paths:
        with Image.open(p) as im:
            ims.append(im.convert("RGB").copy())
    return predict(ims, probe_dir)
