"""``kps-bench world build``: render the data and train every model of the shapes world from scratch."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .render import (BASE_PATTERN_COLOURS, COLOURS, SUBJECT_COLOURS, Factors, render_many,
                     sample_dataset, sample_factors)
from .subjects import SUBJECT_PATTERN_COLOURS, SUBJECTS, reference_images

SEEDS = {"base_data": 1, "probe_data": 2, "heldout": 3, "subjects": 0, "vae": 10, "probe": 11, "t2i": 12,
         "clip": 13, "dino": 14}
STEPS = {"vae": 2500, "probe": 1500, "t2i": 6000, "clip": 1500, "dino": 400}
N_BASE, N_WIDE = 40000, 30000


def wide_dataset(n: int, seed: int):
    """Images of every colour (subject colours too), chromatic pattern colours only on subject colours,
    and occasional centre dots: the probe's (and encoders') wider training distribution."""
    g = np.random.default_rng(seed)
    fs = []
    for _ in range(n):
        f = sample_factors(g, colours=COLOURS)
        if f.colour in SUBJECT_COLOURS:
            pcs = BASE_PATTERN_COLOURS + [c for c in SUBJECT_PATTERN_COLOURS if c not in BASE_PATTERN_COLOURS]
            f.pattern_colour = pcs[g.integers(len(pcs))]
            if g.random() < 0.4:
                f.centre_dot = SUBJECT_PATTERN_COLOURS[g.integers(len(SUBJECT_PATTERN_COLOURS))]
        elif g.random() < 0.1:
            f.centre_dot = BASE_PATTERN_COLOURS[g.integers(2)]
        fs.append(f)
    return render_many(fs), fs


def _save_fp16(module_state: dict) -> dict:
    return {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous()
            for k, v in module_state.items()}


def finalize(out) -> None:
    """Make the saved world load cleanly with default loaders (idempotent, deterministic):

    - the pipeline's text encoder is stored in float32, so ``StableDiffusionPipeline.from_pretrained``
      without ``torch_dtype`` gets one dtype for every component (UNet and VAE load as float32);
    - the DINO ViT is stored with a pooling layer (unused: the CLS token is the feature), so
      ``ViTModel.from_pretrained`` finds every weight it expects.
    """
    import torch
    from transformers import CLIPTextModel, ViTModel

    out = Path(out)
    te_dir = out / "pipeline" / "text_encoder"
    te = CLIPTextModel.from_pretrained(te_dir, torch_dtype=torch.float32)
    for f in te_dir.glob("*.safetensors"):
        f.unlink()
    te.save_pretrained(te_dir, safe_serialization=True)
    ddir = out / "dino"
    from safetensors import safe_open

    with safe_open(str(next(ddir.glob("*.safetensors"))), "pt") as fh:
        if "pooler.dense.weight" in fh.keys():
            return
    cfg_old = ViTModel.from_pretrained(ddir, add_pooling_layer=False, torch_dtype=torch.float32)
    torch.manual_seed(SEEDS["dino"])
    full = ViTModel(cfg_old.config, add_pooling_layer=True)
    missing, unexpected = full.load_state_dict(cfg_old.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("pooler.") for k in missing), (missing, unexpected)
    for f in ddir.glob("*.safetensors"):
        f.unlink()
    full.save_pretrained(ddir, safe_serialization=True)


def build(out: str | os.PathLike, scale: float = 1.0, run_check: bool = True, log=print) -> Path:
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 2) if os.environ.get("KPS_WORLD_THREADS") is None
                          else int(os.environ["KPS_WORLD_THREADS"]))
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer, ViTImageProcessor

    from kps_bench.rundir import write_json_atomic
    from kps_bench.tokenizer import save_clip_tokenizer

    from . import train as T
    from .probe import save_probe

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = {k: max(10, int(v * scale)) for k, v in STEPS.items()}
    n_base, n_wide = max(500, int(N_BASE * min(1.0, scale * 4))), max(500, int(N_WIDE * min(1.0, scale * 4)))
    t0 = time.time()
    timings: dict[str, float] = {}

    def lap(name, t):
        timings[name] = round(time.time() - t, 1)
        log(f"[{name}] {timings[name]:.0f}s (total {time.time() - t0:.0f}s)")

    t = time.time()
    log(f"rendering {n_base} base and {n_wide} wide images")
    base_imgs, base_fs, _ = sample_dataset(n_base, SEEDS["base_data"], with_captions=False)
    wide_imgs, wide_fs = wide_dataset(n_wide, SEEDS["probe_data"])
    all_imgs = np.concatenate([base_imgs, wide_imgs])
    all_fs = base_fs + wide_fs
    lap("render", t)

    # subjects
    subj_dir = out / "subjects"
    from PIL import Image

    for s in SUBJECTS:
        d = subj_dir / s.name
        d.mkdir(parents=True, exist_ok=True)
        (d / "subject.json").write_text(json.dumps(s.to_json(), indent=1))
        for i, im in enumerate(reference_images(s, SEEDS["subjects"])):
            Image.fromarray(im).save(d / f"ref_{i}.png")

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, ViTModel

    stages = out / "_stages"  # per-stage checkpoints: an interrupted build resumes where it stopped

    def done(name):
        m = stages / name / "DONE"
        return m.exists() and json.loads(m.read_text()) == {"steps": steps[name], "seed": SEEDS[name],
                                                             "n": [n_base, n_wide]}

    def mark(name):
        (stages / name).mkdir(parents=True, exist_ok=True)
        (stages / name / "DONE").write_text(json.dumps({"steps": steps[name], "seed": SEEDS[name],
                                                        "n": [n_base, n_wide]}))

    # VAE
    t = time.time()
    if done("vae"):
        vae = AutoencoderKL.from_pretrained(stages / "vae", torch_dtype=torch.float32)
        log("VAE: resumed from checkpoint")
    else:
        vae = T.train_vae(all_imgs, steps["vae"], SEEDS["vae"], batch=32, log=log, lr=2e-3)
        vae.save_pretrained(stages / "vae")
        mark("vae")
    vae.eval()
    lap("vae", t)

    # text encoder + UNet on the base distribution only
    t = time.time()
    tok_dir = out / "_tokenizer"
    save_clip_tokenizer(tok_dir, model_max_length=T.TEXT_LEN)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    if done("t2i"):
        text = CLIPTextModel.from_pretrained(stages / "t2i" / "text_encoder", torch_dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(stages / "t2i" / "unet", torch_dtype=torch.float32)
        log("text encoder + UNet: resumed from checkpoint")
    else:
        lat_mean, lat_std = T.vae_encode(vae, base_imgs)
        text, unet = T.train_t2i(lat_mean, lat_std, base_fs, tokenizer, vae.config.scaling_factor,
                                 steps["t2i"], SEEDS["t2i"], base_lr=1e-3)
        text.save_pretrained(stages / "t2i" / "text_encoder")
        unet.save_pretrained(stages / "t2i" / "unet")
        mark("t2i")
    lap("t2i", t)

    # probe (renders + VAE reconstructions)
    t = time.time()
    if not done("probe"):
        n_rec = min(len(wide_imgs), 8000)
        recon = T.vae_reconstruct(vae, wide_imgs[:n_rec])
        probe = T.train_probe(wide_imgs, wide_fs, steps["probe"], SEEDS["probe"], recon=recon)
        save_probe(probe, out / "probe", {"seed": SEEDS["probe"], "steps": steps["probe"]})
        del recon
        mark("probe")
    lap("probe", t)

    # CLIP
    t = time.time()
    if not done("clip"):
        clip = T.train_clip(all_imgs, all_fs, steps["clip"], SEEDS["clip"])
        cdir = out / "clip"
        cdir.mkdir(exist_ok=True)
        (cdir / "open_clip_config.json").write_text(json.dumps(T.clip_config(), indent=1))
        save_file(_save_fp16(clip.state_dict()), str(cdir / "open_clip_model.safetensors"))
        del clip
        mark("clip")
    lap("clip", t)

    # DINO
    t = time.time()
    if not done("dino"):
        vit = T.train_dino(all_imgs, steps["dino"], SEEDS["dino"])
        ddir = out / "dino"
        if ddir.exists():
            shutil.rmtree(ddir)
        vit.save_pretrained(ddir, safe_serialization=True)
        ViTImageProcessor(do_resize=True, size={"height": 32, "width": 32}, resample=3, do_rescale=True,
                          rescale_factor=1 / 255, do_normalize=True, image_mean=list(T.DINO_MEAN),
                          image_std=list(T.DINO_STD)).save_pretrained(ddir)
        del vit
        mark("dino")
    lap("dino", t)

    sched = DDIMScheduler(**T.scheduler_config())
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pdir = out / "pipeline"
    if pdir.exists():
        shutil.rmtree(pdir)
    pipe.to(torch.float16).save_pretrained(pdir, safe_serialization=True)
    # keep vocab.json + merges.txt (the real CLIP BPE) and drop the 3.6 MB tokenizer.json
    for fname in ["vocab.json", "merges.txt"]:
        shutil.copy(tok_dir / fname, pdir / "tokenizer" / fname)
    tj = pdir / "tokenizer" / "tokenizer.json"
    if tj.exists():
        tj.unlink()
    shutil.rmtree(tok_dir, ignore_errors=True)
    probe_ids = CLIPTokenizer.from_pretrained(pdir / "tokenizer")("a red star on a blue background").input_ids
    assert probe_ids == tokenizer("a red star on a blue background").input_ids, "tokenizer round trip failed"

    finalize(out)
    shutil.rmtree(stages, ignore_errors=True)
    total = round(time.time() - t0, 1)
    info = {
        "command": f"kps-bench world build --out {out}" + (f" --scale {scale}" if scale != 1.0 else ""),
        "duration_s": total,
        "timings_s": timings,
        "seeds": SEEDS,
        "steps": steps,
        "n_images": {"base": n_base, "wide": n_wide},
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    write_json_atomic(out / "build.json", info)
    log(f"world built in {total:.0f}s -> {out}")
    from .card import write_model_card

    write_model_card(out)
    if run_check:
        from .check import check

        check(out, n=200, json_path=out / "check.json", log=log)
        write_model_card(out)
    return out
