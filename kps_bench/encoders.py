"""Image and text encoders used for scoring: open_clip CLIP and a transformers DINO ViT.

Both accept hub names (``ViT-B-32`` + ``openai``; ``facebook/dino-vits16``) and local files, and
return L2-normalised float32 embeddings on the CPU, computed in batches. :func:`embed_images`
encodes each distinct image (by content hash) once.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from .distributed import SINGLE, Ranks
from .errors import UserError
from .models import (PICKLE_SUFFIXES, WEIGHT_SUFFIXES, check_safetensors, combined_hash, file_sha256, folder_weight_hashes,
                     quiet_progress_bars, refuse_pickle)


def _normalise(x):
    import torch

    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def _open_clip_config(arch: str) -> tuple[str, dict | None, Path | None]:
    """Resolve ``arch`` to (open_clip model name, preprocess config, folder holding the config).

    ``arch`` is a registered model name (``ViT-B-32``), ``hf-hub:org/repo``, a folder with an
    ``open_clip_config.json``, or a JSON file with either ``{"model_cfg": ..., "preprocess_cfg": ...}``
    (the hub format) or a bare model config (``embed_dim``, ``vision_cfg``, ``text_cfg``).
    """
    import open_clip

    p = Path(arch)
    if p.is_dir():
        p = p / "open_clip_config.json"
    if not p.suffix == ".json":
        if arch.startswith("hf-hub:") or arch in open_clip.list_models():
            return arch, None, None
        raise UserError(f"encoders.clip.arch '{arch}' is neither an open_clip model name (e.g. ViT-B-32; see "
                        f"open_clip.list_models()), an hf-hub: id, nor a model-config JSON file or folder.")
    if not p.is_file():
        raise UserError(f"encoders.clip.arch: open_clip model config '{p}' does not exist.")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"encoders.clip.arch: '{p}' is not valid JSON ({e.msg}).") from None
    model_cfg, preprocess = (cfg["model_cfg"], cfg.get("preprocess_cfg")) if "model_cfg" in cfg else (cfg, None)
    if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(model_cfg):
        raise UserError(f"encoders.clip.arch: '{p}' must hold an open_clip model config with embed_dim, vision_cfg "
                        f"and text_cfg (optionally under 'model_cfg').")
    name = "kps-" + hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:16]
    if name not in open_clip.list_models():
        # open_clip registers configs by file name; the registry keeps the config once read
        with tempfile.TemporaryDirectory(prefix="kps-open-clip-") as tmp:
            (Path(tmp) / f"{name}.json").write_text(json.dumps(model_cfg), encoding="utf-8")
            open_clip.add_model_config(Path(tmp) / f"{name}.json")
    return name, preprocess, p.parent


class ClipEncoder:
    """open_clip model: ``encode_images(list[PIL]) -> [n, d]`` and ``encode_texts(list[str]) -> [n, d]``."""

    def __init__(self, arch: str, weights: str, device: str = "cpu", batch_size: int = 64,
                 allow_unsafe_pickle: bool = False):
        import open_clip
        import torch

        name, preprocess, cfg_dir = _open_clip_config(arch)
        wfile = Path(weights) if weights else None
        if wfile is None and cfg_dir is not None and (cfg_dir / "open_clip_model.safetensors").is_file():
            wfile = cfg_dir / "open_clip_model.safetensors"  # hub-format folder: weights next to the config
        if wfile is not None and wfile.is_file():
            refuse_pickle(wfile, allow_unsafe_pickle, "encoders.clip.weights")
            if wfile.suffix not in PICKLE_SUFFIXES:
                check_safetensors(wfile, "encoders.clip.weights")
            pretrained, self.weights_sha256 = str(wfile), file_sha256(wfile)
        elif wfile is not None and (wfile.suffix in WEIGHT_SUFFIXES or "/" in weights):
            raise UserError(f"encoders.clip.weights: checkpoint file '{weights}' does not exist.")
        else:
            pretrained, self.weights_sha256 = weights or None, None  # an open_clip pretrained tag such as 'openai'
        try:
            pp = {f"image_{k}": tuple(v) if isinstance(v, list) else v for k, v in (preprocess or {}).items()
                  if k in ("mean", "std", "interpolation", "resize_mode")}
            model, _, transform = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device, **pp)
        except RuntimeError as e:
            raise UserError(f"encoders.clip: cannot load weights '{weights}' into open_clip model '{arch}': "
                            f"{str(e).splitlines()[0]}") from None
        self.model, self.transform = model.eval(), transform
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device, self.batch_size = device, batch_size
        self.identity = {"arch": arch, "weights": weights, "open_clip_name": name, "weights_sha256": self.weights_sha256}
        self._torch = torch

    def encode_images(self, images: Sequence) -> "torch.Tensor":
        torch = self._torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                x = torch.stack([self.transform(im.convert("RGB")) for im in images[i : i + self.batch_size]])
                out.append(_normalise(self.model.encode_image(x.to(self.device))).cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    def encode_texts(self, texts: Sequence[str]) -> "torch.Tensor":
        torch = self._torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                tok = self.tokenizer(list(texts[i : i + self.batch_size])).to(self.device)
                out.append(_normalise(self.model.encode_text(tok)).cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)


def dino_processor(model: str, image_size: int) -> tuple[object, dict]:
    """The model's image processor, and what provenance records of it. A local folder without
    preprocessor_config.json (``ViTModel.save_pretrained`` alone writes none) gets DINO's standard preprocessing,
    with a warning: a bilinear resize to the ViT's input size (224 px for DINO) and ImageNet mean and std."""
    from transformers import AutoImageProcessor, ViTImageProcessor
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if not Path(model).is_dir() or (Path(model) / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(model), {"source": "preprocessor_config.json"}
    from .ui import console

    standard = {"source": "DINO standard (no preprocessor_config.json)", "size": image_size, "resample": "bilinear",
                "mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD)}
    console.print(f"[yellow]warning:[/] encoders.dino.model '{model}' has no preprocessor_config.json; using DINO's "
                  f"standard preprocessing ({image_size} px bilinear resize, ImageNet mean and std).")
    return ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=standard["mean"],
                             image_std=standard["std"]), standard


class DinoEncoder:
    """DINO ViT (transformers ``ViTModel``): the CLS token of the last hidden state, L2-normalised."""

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 64, allow_unsafe_pickle: bool = False):
        import torch
        from transformers import ViTModel

        quiet_progress_bars()
        local = Path(model).exists()
        pooler = False  # facebook/dino-* were converted without a pooler; a folder saved from a full ViTModel has one
        if local:
            weights = [p for p in Path(model).glob("*") if p.suffix in (".safetensors", ".bin")]
            if weights and not any(p.suffix == ".safetensors" for p in weights):
                refuse_pickle(weights[0], allow_unsafe_pickle, "encoders.dino.model weights")
            for p in weights:
                if p.suffix == ".safetensors":
                    pooler = "pooler.dense.weight" in check_safetensors(p, "encoders.dino.model weights") or pooler
        try:
            # built to match the checkpoint (the pooler is unused: the feature is the CLS token), so loading
            # reports only real mismatches
            self.model = ViTModel.from_pretrained(model, add_pooling_layer=pooler,
                                                 use_safetensors=None if allow_unsafe_pickle else True).to(device).eval()
            self.processor, preprocessing = dino_processor(model, self.model.config.image_size)
        except OSError as e:
            raise UserError(f"encoders.dino.model: cannot load '{model}' ({str(e).splitlines()[0]}). Give a hub id "
                            f"such as facebook/dino-vits16 or a folder saved with ViTModel.save_pretrained().") from None
        self.device, self.batch_size = device, batch_size
        self.identity = {"model": model, "sha256": combined_hash(folder_weight_hashes(model)) if local else None,
                         "preprocessing": preprocessing}
        self._torch = torch

    def encode_images(self, images: Sequence) -> "torch.Tensor":
        torch = self._torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                batch = [im.convert("RGB") for im in images[i : i + self.batch_size]]
                px = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
                hidden = self.model(pixel_values=px).last_hidden_state
                out.append(_normalise(hidden[:, 0]).cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)


def loaded(encoders) -> list[tuple[str, object]]:
    """``[(name, encoder)]`` of a ``(clip, dino)`` pair, leaving out those not loaded (None)."""
    return [(name, e) for name, e in zip(("clip", "dino"), encoders) if e is not None]


def embed_images(paths: Sequence[Path], encode: Callable, hashes: Sequence[str], batch_size: int, progress=None,
                 ranks: Ranks = SINGLE) -> dict:
    """Embed images given by path, each distinct content (sha256) once, ``batch_size`` images per ``encode`` call;
    returns ``{sha256: [d]}``. Under a launcher, the batches (the same as in one process) are dealt to the ranks
    (:meth:`Ranks.mine`), and each returns the embeddings of its own."""
    from PIL import Image

    todo, seen = [], set()
    for p, h in zip(paths, hashes):
        if h not in seen:
            seen.add(h)
            todo.append((p, h))
    out = {}
    for part in ranks.mine(todo[i : i + batch_size] for i in range(0, len(todo), batch_size)):
        images = []
        for p, _ in part:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        for (_, h), e in zip(part, encode(images)):
            out[h] = e
        if progress is not None:
            progress(len(part))
    return out
