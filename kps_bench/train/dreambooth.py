"""``dreambooth``: full fine-tuning of the UNet (and, by recipe, the text encoder) with prior preservation.

Follows diffusers' ``examples/dreambooth/train_dreambooth.py`` (Ruiz et al. 2023): class images are
generated once by the base model from the recipe's ``class_prompt`` (``"a {class_noun}"``, never an
evaluation prompt), with seeds from :func:`~kps_bench.protocol.class_image_seed` (in [2**63, 2**64),
so never an evaluation seed), and cached (a content-addressed folder under ``$KPS_BENCH_CACHE``,
default ``~/.cache/kps-bench/class-images``, so every run of the same base and recipe reuses them);
each step runs instance and class samples as one batch, the class samples captioned with the class
prompt, and the loss is ``instance loss + prior_loss_weight * class loss``. Output: a diffusers
pipeline folder (``kps-bench run --adapter OUT`` detects it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..cache import STALE_TEMPORARY_S, default_cache_dir
from ..errors import UserError
from ..rundir import remove_stale_temporaries
from .data import load_reference_pixels
from .trainer import Trainer, Training, to_device
from .lora import mse


def class_image_dir() -> Path:
    return default_cache_dir() / "class-images"


def class_images(trainer: Trainer) -> tuple[list[Path], str]:
    """Make (or find) ``num_class_images`` base-model images of the class prompt; image k has seed
    ``class_image_seed(seed, k)``. Returns their files and the prompt."""
    from ..generate import Job, cache_key, generate, oom_guard
    from ..protocol import class_image_seed, expand_prompt
    from ..ui import progress

    r = trainer.recipe
    prompt = expand_prompt(r.class_prompt, trainer.subject, with_trigger=False)
    gen = dataclasses.replace(trainer.protocol.generation, steps=r.class_sample_steps,
                              guidance_scale=r.class_guidance_scale, resolution=r.resolution)
    device = trainer.accelerator.device
    jobs = []
    for k in range(r.num_class_images):
        seed = class_image_seed(r.seed, k)
        key = cache_key(trainer.base_identity, None, prompt, seed, gen, device.type)
        jobs.append(Job(key, "base", trainer.subject.name, prompt, prompt, False, seed, 0, k))
    folder = class_image_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if trainer.accelerator.is_main_process:
        remove_stale_temporaries(folder, STALE_TEMPORARY_S)  # a killed trainer's half-written class images
    todo = [j for j in jobs if not (folder / j.filename).is_file()]
    if todo and trainer.accelerator.is_main_process:
        pipe = trainer.pipe.to(device)
        batch = trainer.protocol.generation.batch_size
        with progress("class images", len(todo)) as advance, oom_guard("generating class images", batch,
                                                                       "--set generation.batch_size=N in the protocol"):
            generate(pipe, todo, gen, folder, batch, advance)
        pipe.to("cpu")
    trainer.accelerator.wait_for_everyone()
    trainer.extra["class_images"] = {"count": len(jobs), "prompt": prompt, "seeds": [j.seed for j in jobs],
                                     "folder": str(folder), "generated_now": len(todo),
                                     "sample_steps": gen.steps, "guidance_scale": gen.guidance_scale}
    return [folder / j.filename for j in jobs], prompt


def build(trainer: Trainer) -> Training:
    """Class images from the (still untouched) base and their latents, the trainable UNet (and text encoder); the
    loss: instance loss + prior_loss_weight * class loss, one forward pass for both halves."""
    import torch

    r = trainer.recipe
    paths, class_prompt = class_images(trainer)
    class_latents = trainer.encode_latents(load_reference_pixels(paths, trainer.data.latents.size * trainer.vae_factor))
    unet, te = trainer.pipe.unet, trainer.pipe.text_encoder
    unet.to(trainer.device)
    unet.requires_grad_(True)
    unet.train()
    if r.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = {f"unet.{n}": p for n, p in unet.named_parameters()}
    models = [unet]
    captions = trainer.data.captions.with_trigger
    if r.train_text_encoder:
        te.to(trainer.device)
        te.requires_grad_(True)
        te.train()
        params.update({f"text_encoder.{n}": p for n, p in te.named_parameters()})
        models.append(te)
        emb = None
    else:
        to_device(te, trainer.device, trainer.weight_dtype)
        emb = torch.cat([trainer.encode_prompts(captions), trainer.encode_prompts([class_prompt])]).float()
        te.to("cpu")
    prompts = captions + [class_prompt]  # the class prompt follows the instance captions
    class_captions = [0] * len(paths)  # every class image has the class prompt (and no caption draw)
    n = len(captions)

    def loss(model, batch):
        m_unet = model[0]
        cls = trainer.data.sample(cache=class_latents, image_captions=class_captions)
        idx = list(batch.caption_index) + [n + c for c in cls.caption_index]
        if r.train_text_encoder:
            states = trainer.encode_prompts([prompts[i] for i in idx], text_encoder=model[1])
        else:
            states = emb[idx]
        pred = m_unet(torch.cat([batch.noisy, cls.noisy]), torch.cat([batch.timesteps, cls.timesteps]), states).sample
        pred_instance, pred_class = pred.chunk(2)
        instance = mse(pred_instance, trainer.data.target(batch))
        prior = mse(pred_class, trainer.data.target(cls))
        loss = instance + r.prior_loss_weight * prior
        return loss, {"loss": loss.item(), "loss_instance": instance.item(), "loss_prior": prior.item()}

    return Training(params, models, loss)


def save(trainer: Trainer, training: Training) -> list[str]:
    """A complete diffusers pipeline with the fine-tuned weights."""
    from diffusers import StableDiffusionPipeline

    acc, pipe = trainer.accelerator, trainer.pipe
    if acc.is_main_process:
        out = StableDiffusionPipeline(
            vae=pipe.vae, text_encoder=acc.unwrap_model(pipe.text_encoder).to("cpu").eval(), tokenizer=pipe.tokenizer,
            unet=acc.unwrap_model(pipe.unet).to("cpu").eval(), scheduler=pipe.scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        out.save_pretrained(trainer.work, safe_serialization=True)
    files = sorted(str(p.relative_to(trainer.work)) for p in trainer.work.rglob("*")
                   if p.is_file() and p.suffix in (".safetensors", ".json", ".txt") and "checkpoints" not in p.parts)
    if not files:
        raise UserError("DreamBooth produced no pipeline files.")
    return files
