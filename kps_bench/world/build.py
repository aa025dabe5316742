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

from .render import sample_dataset, wide_dataset
from .subjects import SUBJECTS, reference_images

SEEDS = {"base_data": 1, "probe_data": 2, "heldout": 3, "subjects": 0, "vae": 10, "probe": 11, "t2i": 12,
         "clip": 13, "dino": 14}
STEPS = {"vae": 2500, "probe": 2000, "t2i": 6000, "clip": 1500, "dino": 800}
N_BASE, N_WIDE = 40000, 30000
STAGES = ("vae", "t2i", "probe", "clip", "dino")
#: What each stage writes, relative to the world folder (a reused stage is copied from there).
STAGE_FILES = {"vae": ["pipeline/vae"], "t2i": ["pipeline/unet", "pipeline/text_encoder"], "probe": ["probe"],
               "clip": ["clip"], "dino": ["dino"]}


def _save_fp16(module_state: dict) -> dict:
    return {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous()
            for k, v in module_state.items()}


def finalize(out) -> None:
    """Make the saved world load cleanly with default loaders (idempotent, deterministic):

    - no component's config names the folder it was loaded from during the build;
    - the pipeline's text encoder is stored in float32, so ``StableDiffusionPipeline.from_pretrained``
      without ``torch_dtype`` gets one dtype for every component (UNet and VAE load as float32);
    - the DINO ViT is stored with a pooling layer (unused: the CLS token is the feature), so
      ``ViTModel.from_pretrained`` finds every weight it expects.
    """
    import torch
    from transformers import CLIPTextModel, ViTModel

    out = Path(out)
    # a component loaded from a stage checkpoint records that folder; the shipped config must not
    for cfg_file in (out / "pipeline").glob("*/config.json"):
        cfg = json.loads(cfg_file.read_text())
        if cfg.pop("_name_or_path", None) is not None:
            cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
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


def build(out: str | os.PathLike, scale: float = 1.0, run_check: bool = True, log=print, resume: bool = False,
          reuse: tuple[str, ...] = (), reuse_from: str | os.PathLike | None = None) -> Path:
    """Render the data and train every stage of a world into ``out``.

    Finished stages are kept in ``out/_stages`` until the world is assembled; ``resume`` continues an
    interrupted build from them (an interrupted stage starts over). ``reuse`` names stages (``STAGES``) to
    copy from the world ``reuse_from`` (default: the shipped one) instead of training them, e.g. the VAE and
    UNet when only the subjects and encoders change; build.json records where they came from."""
    import torch

    from kps_bench.errors import UserError

    from . import WORLD_DIR, builtin_spec

    torch.set_num_threads(min(2, os.cpu_count() or 2) if os.environ.get("KPS_WORLD_THREADS") is None
                          else int(os.environ["KPS_WORLD_THREADS"]))
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer, ViTImageProcessor

    from kps_bench.rundir import write_json_atomic
    from kps_bench.tokenizer import save_clip_tokenizer

    from . import train as T
    from .probe import save_probe

    out = Path(out)
    stages = out / "_stages"  # per-stage checkpoints: an interrupted build resumes where it stopped
    if stages.exists() and not resume:
        raise UserError(f"{out} holds an unfinished build ({stages}); pass --resume to continue it, or remove the "
                        f"folder to start over.")
    unknown = sorted(set(reuse) - set(STAGES))
    if unknown:
        raise UserError(f"--reuse {unknown[0]}: unknown stage; expected one of {', '.join(STAGES)}.")
    source = Path(reuse_from) if reuse_from else WORLD_DIR
    source_build = json.loads((source / "build.json").read_text()) if (source / "build.json").exists() else {}
    for stage in reuse:
        missing = [f for f in STAGE_FILES[stage] if not (source / f).exists()]
        if missing:
            raise UserError(f"--reuse {stage}: {source / missing[0]} does not exist; --reuse-from must be a world "
                            f"folder written by 'kps-bench world build'.")
    out.mkdir(parents=True, exist_ok=True)
    steps = {k: max(10, int(v * scale)) for k, v in STEPS.items()}
    n_base, n_wide = max(500, int(N_BASE * min(1.0, scale * 4))), max(500, int(N_WIDE * min(1.0, scale * 4)))
    t0 = time.time()
    timings: dict[str, float] = {}
    reused: dict[str, dict] = {}

    def lap(name, t):
        timings[name] = round(time.time() - t, 1)
        log(f"[{name}] {timings[name]:.0f}s (total {time.time() - t0:.0f}s)")

    def marker(name):
        return {"steps": steps[name], "seed": SEEDS[name], "n": [n_base, n_wide]}

    def done(name):
        m = stages / name / "DONE"
        if not m.exists():
            return False
        d = json.loads(m.read_text())
        if d.get("reused"):
            reused[name] = d["reused"]
        return {k: d.get(k) for k in ("steps", "seed", "n")} == marker(name)

    def mark(name, reused_info=None):
        (stages / name).mkdir(parents=True, exist_ok=True)
        write_json_atomic(stages / name / "DONE", {**marker(name), "reused": reused_info})

    def take(name, dest: dict[str, Path]) -> bool:
        """Copy a reused stage's files from the source world; False when the stage is not reused."""
        if name not in reuse:
            return False
        for rel, d in dest.items():
            if d.exists():
                shutil.rmtree(d)
            shutil.copytree(source / rel, d)
        # a stage the source world itself reused keeps its origin (where and how long it was trained)
        info = (source_build.get("reused") or {}).get(name) or {
            "from": builtin_spec(source), "finished_utc": source_build.get("finished_utc"),
            "seconds": (source_build.get("timings_s") or {}).get(name),
            "steps": (source_build.get("steps") or {}).get(name)}
        reused[name] = info
        mark(name, info)
        log(f"{name}: reused from {info['from']}")
        return True

    t = time.time()
    log(f"rendering {n_base} base and {n_wide} wide images")
    base_imgs, base_fs, _ = sample_dataset(n_base, SEEDS["base_data"], with_captions=False)
    wide_imgs, wide_fs = wide_dataset(n_wide, SEEDS["probe_data"])
    all_imgs = np.concatenate([base_imgs, wide_imgs])
    lap("render", t)

    subj_dir = out / "subjects"
    if subj_dir.exists():
        shutil.rmtree(subj_dir)
    from PIL import Image

    for s in SUBJECTS:
        d = subj_dir / s.name
        d.mkdir(parents=True, exist_ok=True)
        (d / "subject.json").write_text(json.dumps(s.to_json(), indent=1))
        for i, im in enumerate(reference_images(s, SEEDS["subjects"])):
            Image.fromarray(im).save(d / f"ref_{i}.png")

    # VAE
    t = time.time()
    if not done("vae") and not take("vae", {"pipeline/vae": stages / "vae"}):
        vae = T.train_vae(all_imgs, steps["vae"], SEEDS["vae"], batch=32, log=log, lr=2e-3)
        vae.save_pretrained(stages / "vae")
        mark("vae")
    vae = AutoencoderKL.from_pretrained(stages / "vae", torch_dtype=torch.float32).eval()
    lap("vae", t)

    # text encoder + UNet on the base distribution only
    t = time.time()
    tok_dir = out / "_tokenizer"
    save_clip_tokenizer(tok_dir, model_max_length=T.TEXT_LEN)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    if not done("t2i") and not take("t2i", {"pipeline/text_encoder": stages / "t2i" / "text_encoder",
                                            "pipeline/unet": stages / "t2i" / "unet"}):
        lat_mean, lat_std = T.vae_encode(vae, base_imgs)
        text, unet = T.train_t2i(lat_mean, lat_std, base_fs, tokenizer, vae.config.scaling_factor,
                                 steps["t2i"], SEEDS["t2i"], base_lr=1e-3)
        text.save_pretrained(stages / "t2i" / "text_encoder")
        unet.save_pretrained(stages / "t2i" / "unet")
        mark("t2i")
    text = CLIPTextModel.from_pretrained(stages / "t2i" / "text_encoder", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(stages / "t2i" / "unet", torch_dtype=torch.float32)
    lap("t2i", t)

    # probe (renders + VAE reconstructions)
    t = time.time()
    if not done("probe") and not take("probe", {"probe": out / "probe"}):
        n_rec = min(len(wide_imgs), 8000)
        recon = T.vae_reconstruct(vae, wide_imgs[:n_rec])
        probe = T.train_probe(wide_imgs, wide_fs, steps["probe"], SEEDS["probe"], recon=recon)
        save_probe(probe, out / "probe", {"seed": SEEDS["probe"], "steps": steps["probe"]})
        del recon
        mark("probe")
    lap("probe", t)

    # CLIP
    t = time.time()
    if not done("clip") and not take("clip", {"clip": out / "clip"}):
        clip = T.train_clip(all_imgs, base_fs + wide_fs, steps["clip"], SEEDS["clip"])
        cdir = out / "clip"
        cdir.mkdir(exist_ok=True)
        (cdir / "open_clip_config.json").write_text(json.dumps(T.clip_config(), indent=1))
        save_file(_save_fp16(clip.state_dict()), str(cdir / "open_clip_model.safetensors"))
        del clip
        mark("clip")
    lap("clip", t)

    # the encoder in DINO's slot
    t = time.time()
    if not done("dino") and not take("dino", {"dino": out / "dino"}):
        vit = T.train_dino_slot(base_fs + wide_fs, steps["dino"], SEEDS["dino"])
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
    command = f"kps-bench world build --out {out}" + (f" --scale {scale}" if scale != 1.0 else "")
    command += "".join(f" --reuse {r}" for r in reuse) + (f" --reuse-from {reuse_from}" if reuse_from else "")
    info = {
        "command": command,
        "duration_s": total,
        "timings_s": timings,
        "reused": reused,
        # the build time from scratch: this build's stages, with each reused stage's time where it was trained
        "from_scratch_s": round(sum(timings.values()) + sum(
            (reused[k]["seconds"] or 0) - timings.get(k, 0) for k in reused), 1),
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
