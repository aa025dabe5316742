"""Tiny, randomly initialised models saved in their libraries' standard formats.

``kps-bench tiny-models --out DIR`` writes a complete local setup (a diffusers pipeline, an
open_clip checkpoint, a DINO ViT folder, reference images, a LoRA, a textual-inversion embedding
and a protocol that points at them; with ``--sdxl`` also an SDXL pipeline, a LoRA and a two-encoder
textual-inversion embedding for it, and their protocol) so that ``kps-bench run`` and ``kps-bench score`` can be
tried, and are tested, through exactly the code paths a real model takes. Images from these models are
noise: only the plumbing is meaningful.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .tokenizer import save_clip_tokenizer

HIDDEN = 32  # the (first) text encoder's embedding size
HIDDEN_2 = 48  # SDXL's second text encoder's
TINY_SUBJECTS = (
    {"name": "red-block", "class_noun": "block", "trigger": "sks", "colour": (200, 40, 40)},
    {"name": "blue-ball", "class_noun": "ball", "trigger": "zwx", "colour": (40, 60, 210)},
)


def tiny_tokenizer(folder: Path):
    """The real CLIP BPE tokenizer (see :mod:`kps_bench.tokenizer`), written to ``folder`` and loaded from it."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(save_clip_tokenizer(folder))


def tiny_vae():
    """A 4-level ``AutoencoderKL``: 4 latent channels at an eighth of the image size, as Stable Diffusion's VAE (so
    the UNet's token counts, and a plan's timings, grow with the resolution as a real model's do)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 64), norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=32)


def tiny_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def tiny_text_encoder_config(vocab_size: int, hidden: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden)


def build_pipeline(out: Path, seed: int = 0) -> Path:
    """A Stable-Diffusion-shaped pipeline (CLIP text encoder, UNet, VAE, DDIM) at 32 px."""
    import shutil

    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(out / "_tokenizer")
    text_encoder = CLIPTextModel(tiny_text_encoder_config(len(tokenizer), HIDDEN))
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN, attention_head_dim=8, norm_num_groups=32)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=tiny_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out / "pipeline")
    shutil.rmtree(out / "_tokenizer")
    return out / "pipeline"


def build_sdxl_pipeline(out: Path, seed: int = 0) -> Path:
    """An SDXL-shaped pipeline at 32 px: ``CLIPTextModel`` (size HIDDEN) and ``CLIPTextModelWithProjection`` (size
    HIDDEN_2, whose pooled projection conditions the UNet), a UNet with ``addition_embed_type="text_time"`` that
    attends to both encoders' states side by side (HIDDEN + HIDDEN_2), and the VAE and scheduler of
    :func:`build_pipeline`."""
    import shutil

    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(out / "_tokenizer")
    text_encoder = CLIPTextModel(tiny_text_encoder_config(len(tokenizer), HIDDEN))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_encoder_config(len(tokenizer), HIDDEN_2))
    time_dim = 8  # SDXL embeds 6 numbers (original size, crop corner, target size) at this size each
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN + HIDDEN_2, attention_head_dim=8, norm_num_groups=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + HIDDEN_2)
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=tiny_scheduler())
    pipe.save_pretrained(out / "pipeline")
    shutil.rmtree(out / "_tokenizer")
    return out / "pipeline"


def build_open_clip(out: Path, seed: int = 0) -> Path:
    """An open_clip CLIP from a small custom config, saved in the hub layout (config JSON + safetensors)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = {"embed_dim": HIDDEN,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    folder = out / "clip"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg,
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}, indent=2))
    torch.manual_seed(seed)
    name = "kps-tiny-clip"
    open_clip.factory._MODEL_CONFIGS[name] = cfg  # build from the dict without touching open_clip's config folder
    model = open_clip.create_model(name)
    del open_clip.factory._MODEL_CONFIGS[name]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def build_dino(out: Path, seed: int = 0) -> Path:
    """A small transformers ViTModel with its image processor, like facebook/dino-vits16 at 32 px."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    folder = out / "dino"
    model = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=HIDDEN, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(folder)
    return folder


def build_references(out: Path, seed: int = 0, n: int = 4) -> dict[str, Path]:
    """``n`` PNG reference images per tiny subject: a coloured square at a random place on grey."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folders = {}
    for s in TINY_SUBJECTS:
        folder = out / "references" / s["name"]
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.full((32, 32, 3), 128, np.uint8)
            x, y = rng.integers(0, 16, size=2)
            img[y : y + 16, x : x + 16] = s["colour"]
            Image.fromarray(img).save(folder / f"{i}.png")
        folders[s["name"]] = folder
    return folders


def build_lora(pipeline_dir: Path, out: Path, rank: int = 4, seed: int = 0,
               text_encoders: tuple[str, ...] = ()) -> Path:
    """A random (non-zero) peft LoRA on the UNet's attention projections and on those of the named text encoders,
    saved with the pipeline class's ``save_lora_weights`` (``pytorch_lora_weights.safetensors``)."""
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from .models import quiet_progress_bars

    quiet_progress_bars()
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    torch.manual_seed(seed)
    targets = {"unet": ["to_q", "to_k", "to_v", "to_out.0"],
               **{name: ["q_proj", "k_proj", "v_proj", "out_proj"] for name in text_encoders}}
    layers = {}
    for name, modules in targets.items():
        component = getattr(pipe, name)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=modules),
                                component)
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(component))
    type(pipe).save_lora_weights(out, **layers)
    return out


def build_textual_inversion(out: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    """A ``learned_embeds.safetensors`` of one vector per key, ``{key: [1, size]}``: diffusers' format is
    ``{token: [1, HIDDEN]}``, SDXL's ``{"clip_l": [1, HIDDEN], "clip_g": [1, HIDDEN_2]}`` (one per text encoder)."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    save_file({key: torch.randn(1, size) for key, size in sizes.items()}, str(out / "learned_embeds.safetensors"))
    return out


def tiny_protocol(name: str = "tiny", base_model: str = "pipeline") -> dict:
    """A protocol over the tiny models, with paths relative to the protocol file."""
    return {
        "name": name, "version": "1.0", "base_model": base_model,
        "description": "Tiny random models for plumbing tests; numbers are meaningless.",
        "generation": {"scheduler": "ddim", "steps": 2, "guidance_scale": 2.0, "resolution": 32,
                       "images_per_prompt": 2, "seed": 7, "batch_size": 4, "dtype": "float32"},
        "encoders": {"clip": {"arch": "clip/open_clip_config.json", "weights": "clip/open_clip_model.safetensors"},
                     "dino": {"model": "dino"}, "batch_size": 16},
        "subjects": [{"name": s["name"], "class_noun": s["class_noun"], "trigger": s["trigger"],
                      "references": f"references/{s['name']}"} for s in TINY_SUBJECTS],
        "prompts": ["a photo of a {subject}", "a {subject} on a table"],
        "bootstrap": {"resamples": 200, "seed": 0, "confidence": 0.95},
        "training": {"defaults": {"captions": ["a {subject}"]}},  # not an evaluation prompt
    }


def build_sdxl(out: Path) -> Path:
    """The SDXL part of ``tiny-models --sdxl``: ``sdxl/pipeline``, ``sdxl/lora`` (UNet and both text encoders),
    ``sdxl/textual-inversion`` (the two-encoder ``clip_l``/``clip_g`` embedding) and ``tiny-sdxl.yaml``, which
    shares the encoders and references of ``tiny.yaml`` in ``out``. Returns the protocol's path."""
    pipeline = build_sdxl_pipeline(out / "sdxl")
    build_lora(pipeline, out / "sdxl" / "lora", text_encoders=("text_encoder", "text_encoder_2"))
    build_textual_inversion(out / "sdxl" / "textual-inversion", {"clip_l": HIDDEN, "clip_g": HIDDEN_2})
    path = out / "tiny-sdxl.yaml"
    path.write_text(yaml.safe_dump(tiny_protocol("tiny-sdxl", "sdxl/pipeline"), sort_keys=False))
    return path


def build_all(out: str | Path, force: bool = False, sdxl: bool = False) -> list[Path]:
    """Write everything (and the SDXL models with ``sdxl``); returns the protocol paths, ``out/tiny.yaml`` first. A
    folder that already holds files is refused unless ``force``."""
    from .errors import UserError
    from .rundir import check_writable

    out = Path(out)
    check_writable(out)
    if not force and out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out '{out}' already holds files, which tiny-models would overwrite. Choose an empty or "
                        f"new folder, or pass --force.")
    out.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(out)
    build_open_clip(out)
    build_dino(out)
    build_references(out)
    build_lora(pipeline, out / "lora")
    build_textual_inversion(out / "textual-inversion", {TINY_SUBJECTS[0]["trigger"]: HIDDEN})
    path = out / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_protocol(), sort_keys=False))
    return [path] + ([build_sdxl(out)] if sdxl else [])
