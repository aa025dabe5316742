"""The training core shared by the four baseline trainers.

Every trainer runs the same way: a *recipe* (``baselines/<method>.yaml`` after the recipes it
inherits, then the protocol's ``training:`` sections, then ``--set`` and ``--seed``; see
:func:`load_recipe`) fixes every hyperparameter; the subject's reference images are encoded by the
frozen VAE once and cached; captions come from the recipe's templates, which must not be evaluation
prompts; every random draw (reference image, caption, flip, crop, latent sample, noise, timestep)
comes from one seeded CPU ``torch.Generator`` whose state is checkpointed, so ``--resume`` continues
exactly where an interrupted run stopped. Training writes into ``OUT.partial`` and renames it to
``OUT`` only when it finished, so a failed run never leaves a half-written adapter behind.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import RECIPES, apply_sets, coerce, list_files, read_mapping, resolve_inherit, search_dirs
from ..errors import UserError
from ..protocol import Protocol, Subject, canonical_json, expand_prompt

METHODS = ("cat", "lora", "dreambooth", "textual-inversion")
PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
LOG_FILE = "train_log.csv"
TRAINING_JSON = "training.json"
CHECKPOINT_FILE = "state.pt"
DIVERGED_FILE = "diverged.json"  # in OUT.partial: the run diverged after its last checkpoint; --resume may change the recipe


# ----------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Recipe:
    """Every hyperparameter of one training run. Method-specific fields are only accepted for their method."""

    method: str
    # optimisation
    steps: int = 1000
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    scale_lr: bool = False  # multiply the learning rate by batch_size * gradient_accumulation_steps * processes
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "no"  # accelerate mixed precision: no | fp16 | bf16 (trainable parameters stay float32)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    # data
    resolution: int = 512
    random_flip: bool = True
    crop_margin: float = 0.125  # random crop: the image is encoded at (1 + margin) x resolution and cropped in latent space
    captions: tuple[str, ...] = ()  # caption templates with {subject}; empty = the protocol's prompts
    # probability that a training sample gets the empty prompt (the unconditional branch that
    # classifier-free guidance subtracts), so the adapter moves it consistently with the captioned one
    caption_dropout: float = 0.0
    # lora / cat
    rank: int = 1
    alpha: float = 1.0
    # peft target_modules (module-name suffixes); default: the UNet attention projections, as diffusers' scripts
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    cat_weight: float = 1.0
    # dreambooth
    prior_loss_weight: float = 1.0
    num_class_images: int = 200
    class_prompt: str = "a {class_noun}"  # the prompt of the class images and their prior-preservation caption
    class_sample_steps: int = 50
    class_guidance_scale: float = 7.5
    train_text_encoder: bool = False
    # textual inversion
    num_vectors: int = 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["captions"] = list(self.captions)
        d["target_modules"] = list(self.target_modules)
        return {k: v for k, v in d.items() if k in allowed_fields(self.method)}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(canonical_json(self.to_dict()).encode()).hexdigest()


_METHOD_ONLY = {
    "rank": ("lora", "cat"), "alpha": ("lora", "cat"), "target_modules": ("lora", "cat"), "cat_weight": ("cat",),
    "prior_loss_weight": ("dreambooth",), "num_class_images": ("dreambooth",), "class_prompt": ("dreambooth",),
    "class_sample_steps": ("dreambooth",), "class_guidance_scale": ("dreambooth",),
    "train_text_encoder": ("dreambooth",), "num_vectors": ("textual-inversion",),
}
_SET_EXAMPLE = "--set steps=200, --set cat_weight=0.5 or --set \"captions.0=a photo of a {subject}\""


def allowed_fields(method: str) -> list[str]:
    return [f.name for f in dataclasses.fields(Recipe) if method in _METHOD_ONLY.get(f.name, (method,))]


def recipe_file_layers(method: str) -> list[tuple[str, dict]]:
    """The recipe file of ``method`` (``baselines/METHOD.yaml``, see :data:`kps_bench.config.RECIPES`) and the
    files it inherits, root first, as (file, mapping)."""
    if method not in METHODS:
        raise UserError(f"Unknown training method '{method}'. Known methods: {', '.join(METHODS)}.")

    def lookup(name: str) -> tuple[str, dict] | None:
        known = list_files(RECIPES)
        return (str(known[name]), read_mapping(known[name], RECIPES)) if name in known else None

    first = lookup(method)
    if first is None:
        raise UserError(f"No recipe for '{method}': {method}.yaml is in none of "
                        f"{', '.join(map(str, search_dirs(RECIPES))) or './baselines'} (add a folder with "
                        f"${RECIPES.env}).")
    return _one_method(resolve_inherit(first, lookup, sorted(list_files(RECIPES)), "recipe"), method)


def protocol_layers(protocol: Protocol, method: str) -> list[tuple[str, dict]]:
    """The protocol's ``training.defaults`` and ``training.METHOD`` sections, the latter after the sections it
    inherits (``inherit: lora``), as (where, mapping)."""
    where = f"protocol '{protocol.name}' training"
    training = {k: v or {} for k, v in protocol.training.items()}
    unknown = sorted(set(training) - {"defaults", *METHODS})
    if unknown:
        raise UserError(f"{where}: unknown section '{unknown[0]}'; expected 'defaults' or a method "
                        f"({', '.join(METHODS)}).")
    for section, part in training.items():
        if not isinstance(part, dict):
            raise UserError(f"{where}.{section}: must be a mapping of recipe fields, got {type(part).__name__}.")
    if "inherit" in training.get("defaults", {}):
        raise UserError(f"{where}.defaults: field 'inherit' belongs in a method section (e.g. training.cat: "
                        f"{{inherit: lora}}); the defaults apply to every method already.")
    layers = [(f"{where}.defaults", training["defaults"])] if "defaults" in training else []
    if method in training:
        def lookup(name: str) -> tuple[str, dict] | None:
            return (f"{where}.{name}", training[name]) if name in METHODS and name in training else None

        known = [m for m in METHODS if m in training]
        layers += _one_method(resolve_inherit((f"{where}.{method}", training[method]), lookup, known,
                                              "method section of 'training'"), method)
    return layers


def _one_method(chain: list[tuple[str, dict]], method: str) -> list[tuple[str, dict]]:
    """``chain`` without its ``method`` fields, after checking that the last one given (an inheriting layer's
    overrides its parent's) is ``method``."""
    named = [(where, layer["method"]) for where, layer in chain if "method" in layer]
    if named:
        _check_field("method", named[-1][1], method, named[-1][0])
    return [(where, {k: v for k, v in layer.items() if k != "method"}) for where, layer in chain]


def load_recipe(method: str, protocol: Protocol | None = None, overrides=(),
                seed: int | None = None) -> tuple[Recipe, list[str]]:
    """The effective recipe and where its values came from, in merge order: the recipe file after the files it
    inherits, the protocol's ``training.defaults``, its ``training.METHOD`` after the sections that inherits, the
    ``--set`` overrides, then ``seed`` (``train-baseline --seed``). With a protocol, its training captions must not be
    evaluation prompts (:func:`check_prompt_overlap`)."""
    layers = recipe_file_layers(method) + (protocol_layers(protocol, method) if protocol is not None else [])
    values: dict = {}
    origin: dict[str, str] = {}
    for where, layer in layers:
        for name, value in layer.items():
            _check_field(name, value, method, where)
            values[name], origin[name] = value, where
    sources = [w for w, _ in layers]
    if overrides:
        merged = apply_sets(values, overrides, "the recipe", _SET_EXAMPLE)
        for name, value in merged.items():
            if name not in values or value != values[name]:
                _check_field(name, value, method, "--set")
                values[name], origin[name] = value, "--set"
        sources.append("--set")
    if seed is not None:
        values["seed"], origin["seed"] = seed, "--seed"
        sources.append("--seed")
    types = {f.name: f.type for f in dataclasses.fields(Recipe)}
    recipe = Recipe(method=method, **{name: coerce(v, types[name], name, origin[name]) for name, v in values.items()
                                      if name != "method"})
    validate_recipe(recipe, " <- ".join(reversed(sources)))
    if protocol is not None:
        check_prompt_overlap(protocol, recipe, origin.get("captions", "the recipe's default"))
    return recipe, sources


def _check_field(name: str, value, method: str, where: str) -> None:
    """A field a layer gives must be one of ``method``'s (``method`` itself only with this method's name)."""
    if name == "method":
        if value != method:
            raise UserError(f"{where}: field 'method' is '{value}' but this is the '{method}' recipe.")
        return
    if name not in allowed_fields(method):
        hint = f" ('{name}' is only used by {', '.join(_METHOD_ONLY[name])})" if name in _METHOD_ONLY else ""
        note = " ('inherit' is read in recipe files and method sections only)" if name == "inherit" else ""
        raise UserError(f"{where}: unknown field '{name}' for method '{method}'{hint}{note}. Allowed fields: "
                        f"{', '.join(a for a in allowed_fields(method) if a != 'method')}.")


def validate_recipe(r: Recipe, where: str) -> None:
    def req(ok, name, expected):
        if not ok:
            raise UserError(f"recipe ({where}): field '{name}' must be {expected}, got {getattr(r, name)!r}.")

    for name in ("steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every", "rank",
                 "num_class_images", "class_sample_steps", "num_vectors"):
        req(getattr(r, name) >= 1, name, "an integer >= 1")
    req(r.seed >= 0, "seed", "an integer >= 0")
    req(r.learning_rate > 0, "learning_rate", "a number > 0")
    req(r.lr_scheduler in LR_SCHEDULES, "lr_scheduler", f"one of {', '.join(LR_SCHEDULES)}")
    req(r.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}")
    req(r.resolution >= 8 and r.resolution % 8 == 0, "resolution", "a multiple of 8")
    req(0 <= r.crop_margin <= 1, "crop_margin", "a number between 0 and 1")
    req(0 <= r.caption_dropout < 1, "caption_dropout", "a probability in [0, 1)")
    req(r.lr_warmup_steps >= 0, "lr_warmup_steps", "an integer >= 0")
    req(r.max_grad_norm > 0, "max_grad_norm", "a number > 0")
    req(r.cat_weight >= 0, "cat_weight", "a number >= 0")
    req(r.prior_loss_weight >= 0, "prior_loss_weight", "a number >= 0")
    req(r.alpha > 0, "alpha", "a number > 0")
    req("{class_noun}" in r.class_prompt, "class_prompt", "a template containing '{class_noun}', e.g. \"a {class_noun}\"")
    for i, c in enumerate(r.captions):
        if "{subject}" not in c:
            raise UserError(f"recipe ({where}): field 'captions' item {i} must contain '{{subject}}', got {c!r}.")


def training_prompts(protocol: Protocol, subject: Subject, recipe: Recipe) -> dict[str, tuple[str, str]]:
    """Every prompt ``recipe`` trains ``subject`` on -> (its template, the recipe field it comes from): the captions
    with and without the trigger, and DreamBooth's class prompt."""
    out = {}
    for t in caption_templates(protocol, subject, recipe):
        for trigger in (True, False):
            out.setdefault(expand_prompt(t, subject, trigger), (t, "captions"))
    if recipe.method == "dreambooth":
        out.setdefault(expand_prompt(recipe.class_prompt, subject, False), (recipe.class_prompt, "class_prompt"))
    return out


def check_prompt_overlap(protocol: Protocol, recipe: Recipe, captions_from: str) -> None:
    """Refuse a recipe that trains a subject of ``protocol`` on one of that subject's evaluation prompts (with or
    without the trigger, each side expanded by :func:`expand_prompt`), unless the protocol says
    ``allow_prompt_overlap: true``. ``captions_from`` names the layer that set the recipe's captions."""
    if protocol.allow_prompt_overlap:
        return
    found = []
    for s in protocol.subjects:
        trained = training_prompts(protocol, s, recipe)
        field_name = f"prompt_sets.{s.prompt_set}" if s.prompt_set else "prompts"
        for i, p in enumerate(protocol.prompts_for(s)):
            for text in dict.fromkeys(expand_prompt(p, s, trigger) for trigger in (True, False)):
                if text in trained:
                    found.append((*trained[text], f"{field_name}.{i}", p, s.name, text))
    if not found:
        return
    template, recipe_field, field_name, prompt, subject, text = found[0]
    source = (f"field 'class_prompt' of the {recipe.method} recipe" if recipe_field == "class_prompt" else
              f"field 'captions', set by {captions_from}" if recipe.captions else
              f"the protocol's prompts, which an empty 'captions' ({captions_from}) trains on")
    more = f" ({len(found) - 1} more overlap{'s' if len(found) > 2 else ''} like it)" if len(found) > 1 else ""
    raise UserError(f"{protocol.file or 'protocol ' + repr(protocol.name)}: the {recipe.method} training prompt "
                    f"'{template}' (from {source}) equals the evaluation prompt '{prompt}' (field '{field_name}') for "
                    f"subject '{subject}': both give '{text}'{more}. Training on evaluation prompts leaks the "
                    f"evaluation into training. Expected training captions disjoint from the evaluation prompts: set "
                    f"training.defaults.captions (or --set captions=[...]) to templates that are not evaluation "
                    f"prompts, such as \"a photo of a {{subject}}\" where that is not one; or set "
                    f"allow_prompt_overlap: true in the protocol to accept the overlap (recorded in provenance).")


# ----------------------------------------------------------------------------- data


@dataclass
class Batch:
    """One training batch: everything random is drawn from the trainer's generator in a fixed order."""

    latents: object  # z_0, [B, C, h, w] (scaled)
    noise: object  # epsilon
    timesteps: object
    noisy: object  # z_t
    caption_index: list[int]
    image_index: list[int]


@dataclass
class Captions:
    """Caption templates and their expansions. With ``dropout`` (``caption_dropout > 0``) every expansion
    has one more entry, the empty prompt, at index ``len(templates)`` (its trigger-free twin is empty too)."""

    templates: list[str]
    dropout: bool
    with_trigger: list[str]
    without_trigger: list[str]

    def expand(self, subject: Subject, trigger: bool) -> list[str]:
        """The templates for another spelling of the subject (textual inversion's multi-vector trigger)."""
        return expand_captions(self.templates, subject, trigger, self.dropout)


def expand_captions(templates: list[str], subject: Subject, trigger: bool, dropout: bool) -> list[str]:
    """Every template with ``{subject}`` filled in, then the empty prompt when captions drop out."""
    return [expand_prompt(t, subject, trigger) for t in templates] + ([""] if dropout else [])


def caption_templates(protocol: Protocol, subject: Subject, recipe: Recipe) -> list[str]:
    """The recipe's caption templates, or the subject's evaluation prompts when it has none (refused by
    :func:`check_prompt_overlap` unless the protocol allows the overlap)."""
    return list(recipe.captions) or list(protocol.prompts_for(subject))


def build_captions(protocol: Protocol, subject: Subject, recipe: Recipe) -> Captions:
    templates, dropout = caption_templates(protocol, subject, recipe), recipe.caption_dropout > 0
    return Captions(templates, dropout, expand_captions(templates, subject, True, dropout),
                    expand_captions(templates, subject, False, dropout))


def load_reference_pixels(paths: list[Path], size: int):
    """Reference images as a float tensor in [-1, 1], centre-cropped to a square and resized to ``size``."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((size, size), Image.BICUBIC)
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return torch.stack(out)


class LatentCache:
    """VAE posterior (mean, std) of every image, computed once; each draw samples, flips and crops in latent space."""

    def __init__(self, vae, pixels, latent_size: int, scaling_factor: float, shift_factor: float | None = None,
                 batch: int = 8):
        import torch

        means, stds = [], []
        with torch.no_grad():
            for i in range(0, len(pixels), batch):
                x = pixels[i : i + batch].to(vae.device, dtype=vae.dtype)
                dist = vae.encode(x).latent_dist
                means.append(dist.mean.float().cpu())
                stds.append(dist.std.float().cpu())
        self.mean, self.std = torch.cat(means), torch.cat(stds)
        self.size = latent_size
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor or 0.0

    def __len__(self):
        return len(self.mean)

    def draw(self, i: int, gen, flip: bool):
        import torch

        full = self.mean.shape[-1]
        y = int(torch.randint(0, full - self.size + 1, (1,), generator=gen)) if full > self.size else 0
        x = int(torch.randint(0, full - self.size + 1, (1,), generator=gen)) if full > self.size else 0
        mean = self.mean[i, :, y : y + self.size, x : x + self.size]
        std = self.std[i, :, y : y + self.size, x : x + self.size]
        z = mean + std * torch.randn(mean.shape, generator=gen)
        if flip:
            z = torch.flip(z, dims=[-1])
        return (z - self.shift_factor) * self.scaling_factor


# ----------------------------------------------------------------------------- the trainer


@dataclass
class TrainResult:
    out: Path
    training: dict


@dataclass
class Trainer:
    """Shared state and helpers of one run; a method module builds its parameters and loss, then calls :meth:`fit`."""

    method: str
    protocol: Protocol
    subject: Subject
    recipe: Recipe
    recipe_sources: list[str]
    out: Path
    work: Path
    device_arg: str = "auto"
    resume: bool = False
    stop_after: int | None = None  # tests: stop (as if interrupted) after this many steps, right after a checkpoint
    # filled by setup()
    accelerator: object = None
    pipe: object = None
    base_identity: dict = field(default_factory=dict)
    noise_scheduler: object = None
    latents: LatentCache | None = None
    captions: Captions | None = None
    gen: object = None
    weight_dtype: object = None
    t0: float = 0.0
    start_time: str = ""
    final_losses: dict = field(default_factory=dict)
    log_rows: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    # ---- setup

    @property
    def device(self):
        return self.accelerator.device

    def setup(self) -> None:
        """Accelerator, base pipeline (frozen), noise scheduler, captions, cached latents, seeded generator."""
        import torch
        from accelerate import Accelerator
        from diffusers import DDPMScheduler

        from ..models import load_pipeline, resolve_device
        from ..provenance import now_iso
        from ..run import reference_images

        self.t0, self.start_time = time.perf_counter(), now_iso()
        device = resolve_device(self.device_arg)
        precision = self.recipe.precision
        if device == "cpu" and precision == "fp16":
            precision = "no"  # CPU autocast has no float16; record what actually ran
        if device.startswith("cuda:"):
            torch.cuda.set_device(int(device.split(":")[1]))
        self.accelerator = Accelerator(mixed_precision=precision, cpu=device == "cpu")
        self.extra["precision"] = precision
        self.weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        refs = reference_images(self.protocol, self.subject)
        resolved = self.protocol.resolve(self.protocol.base_model, "pipeline")
        loaded = load_pipeline(self.protocol.base_model, resolved, "cpu", "float32", self.protocol.generation.scheduler)
        self.pipe, self.base_identity = loaded.pipe, loaded.identity
        refuse_sdxl(self.protocol, type(self.pipe))  # a base that declared no class make_trainer could read
        for name in ("unet", "vae", "text_encoder", "tokenizer"):
            if getattr(self.pipe, name, None) is None:
                raise UserError(f"Base model '{self.protocol.base_model}' has no '{name}': train-baseline supports "
                                f"Stable-Diffusion-style pipelines (UNet, VAE, one CLIP text encoder).")
        for m in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder):
            m.requires_grad_(False)
            m.eval()
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.captions = build_captions(self.protocol, self.subject, self.recipe)
        r = self.recipe
        factor = self.vae_factor
        if r.resolution % factor:
            raise UserError(f"recipe: resolution {r.resolution} must be a multiple of the VAE's factor {factor}.")
        lat = r.resolution // factor
        margin = int(round(lat * r.crop_margin))
        pixels = load_reference_pixels(refs, (lat + margin) * factor)
        self.latents = self.encode_latents(pixels)
        self.extra["reference_images"] = [p.name for p in refs]
        self.gen = torch.Generator("cpu").manual_seed(r.seed + 1_000_003 * self.accelerator.process_index)
        torch.manual_seed(r.seed)  # adapter initialisation (peft's kaiming init) draws from the global RNG
        self.accelerator.wait_for_everyone()  # every process has checked OUT / OUT.partial before one creates it

    # ---- data

    def encode_latents(self, pixels) -> LatentCache:
        """Encode images once with the frozen VAE (on the training device), keep the posteriors on the CPU."""
        vae = self.pipe.vae.to(self.device)
        try:
            return LatentCache(vae, pixels, self.recipe.resolution // self.vae_factor, vae.config.scaling_factor,
                               getattr(vae.config, "shift_factor", None))
        finally:
            vae.to("cpu")

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def encode_prompts(self, prompts: list[str], text_encoder=None):
        """Last hidden state of the text encoder (frozen unless it is passed in with gradients on)."""
        import torch

        te = text_encoder if text_encoder is not None else self.pipe.text_encoder
        tok = self.pipe.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        ctx = contextlib.nullcontext() if text_encoder is not None else torch.no_grad()
        with ctx:
            return te(ids)[0]

    def sample_batch(self, n: int | None = None, cache: LatentCache | None = None,
                     image_captions: list[int] | None = None) -> Batch:
        """Draw ``n`` (image, caption, flip, crop, latent, noise, timestep) tuples from the generator.

        ``image_captions`` fixes each image's caption (DreamBooth class images); otherwise captions are drawn.
        """
        import torch

        n = n or self.recipe.batch_size
        cache = cache or self.latents
        g = self.gen
        zs, img_idx, cap_idx = [], [], []
        for _ in range(n):
            i = int(torch.randint(0, len(cache), (1,), generator=g))
            if image_captions is None:
                c = int(torch.randint(0, len(self.captions.templates), (1,), generator=g))
                # no draw at all without dropout: the random stream (and so every result) stays as before
                if self.recipe.caption_dropout > 0 and float(torch.rand((1,), generator=g)) < self.recipe.caption_dropout:
                    c = len(self.captions.templates)  # the empty prompt
            else:
                c = image_captions[i]
            flip = self.recipe.random_flip and bool(torch.rand((1,), generator=g) < 0.5)
            zs.append(cache.draw(i, g, flip))
            img_idx.append(i)
            cap_idx.append(c)
        latents = torch.stack(zs)
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=g)
        latents, noise, timesteps = latents.to(self.device), noise.to(self.device), timesteps.to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        return Batch(latents, noise, timesteps, noisy, cap_idx, img_idx)

    def target(self, batch: Batch):
        """What the UNet predicts: the noise (epsilon) or the velocity, as the base scheduler says."""
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return batch.noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(batch.latents, batch.noise, batch.timesteps)
        raise UserError(f"Base scheduler prediction_type '{kind}' is not supported for training (epsilon or v_prediction).")

    # ---- the loop

    def fit(self, params: dict, model, compute_loss: Callable, after_step: Callable | None = None,
            lr: float | None = None) -> dict:
        """Optimise ``params`` (name -> tensor) with AdamW; ``compute_loss(model, batch) -> (loss, {term: value})``."""
        import torch
        from diffusers.optimization import get_scheduler

        from ..ui import progress

        r, acc = self.recipe, self.accelerator
        lr = lr or r.learning_rate
        if r.scale_lr:
            lr = lr * r.batch_size * r.gradient_accumulation_steps * acc.num_processes
        self.extra["learning_rate_effective"] = lr
        trainable = list(params.values())
        for p in trainable:
            if p.dtype != torch.float32:
                raise RuntimeError("trainable parameters must be float32")  # programming error, not user input
        optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(r.adam_beta1, r.adam_beta2),
                                      weight_decay=r.adam_weight_decay, eps=r.adam_epsilon)
        scheduler = get_scheduler(r.lr_scheduler, optimizer, num_warmup_steps=r.lr_warmup_steps,
                                  num_training_steps=r.steps)
        models = model if isinstance(model, (list, tuple)) else [model]
        *models, optimizer = acc.prepare(*models, optimizer)
        model = models if isinstance(model, (list, tuple)) else models[0]
        start = self._load_checkpoint(params, optimizer, scheduler) if self.resume else 0
        log = self._open_log(start)
        try:
            with progress(f"train {self.method} · {self.subject.name}", r.steps) as advance:
                advance(start)
                for step in range(start, r.steps):
                    sums: dict[str, float] = {}
                    for micro in range(r.gradient_accumulation_steps):
                        sync = micro == r.gradient_accumulation_steps - 1
                        ctx = (contextlib.nullcontext() if sync or acc.num_processes == 1
                               else _no_sync_all(acc, models))
                        with ctx:
                            batch = self.sample_batch()
                            with acc.autocast():
                                loss, terms = compute_loss(model, batch)
                            acc.backward(loss / r.gradient_accumulation_steps)
                        for k, v in terms.items():
                            sums[k] = sums.get(k, 0.0) + float(v) / r.gradient_accumulation_steps
                    grad_norm = acc.clip_grad_norm_(trainable, r.max_grad_norm)
                    if not all(math.isfinite(v) for v in [*sums.values(), float(grad_norm)]):
                        self._diverged(step + 1, sums, float(grad_norm), lr)
                    current_lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if after_step is not None:
                        after_step()
                    row = {"step": step + 1, **{k: f"{v:.6g}" for k, v in sums.items()},
                           "lr": f"{current_lr:.6g}", "grad_norm": f"{float(grad_norm):.6g}",
                           "elapsed_s": f"{time.perf_counter() - self.t0:.2f}"}
                    log(row)
                    advance(1)
                    done = step + 1
                    if done < r.steps and done % r.checkpoint_every == 0:
                        if not all(bool(torch.isfinite(p).all()) for p in trainable):
                            self._diverged(done, sums, float(grad_norm), lr, "the trained weights became inf or NaN")
                        self._save_checkpoint(params, optimizer, scheduler, done)
                    if self.stop_after is not None and done >= self.stop_after and done < r.steps:
                        raise TrainingInterrupted(done)
        except torch.OutOfMemoryError:
            raise UserError(f"GPU out of memory while training {self.method} at batch size {r.batch_size}, "
                            f"resolution {r.resolution}. Lower it with --set batch_size=N (and raise "
                            f"gradient_accumulation_steps to keep the effective batch), --set gradient_checkpointing=true, "
                            f"or --set precision=fp16.") from None
        finally:
            log(None)
        # from the whole log, which keeps the steps before a resume, so a resumed run reports what an
        # uninterrupted one does
        rows = self.log_rows
        tail = rows[-max(1, len(rows) // 10):]
        keys = [k for k in rows[-1] if k.startswith("loss")] if rows else []
        self.final_losses = {
            "last_step": {k: float(rows[-1][k]) for k in keys},
            "mean_last_10pct": {k: sum(float(t[k]) for t in tail) / len(tail) for k in keys},
        }
        return self.final_losses

    def _diverged(self, step: int, losses: dict, grad_norm: float, lr: float, what: str = "") -> None:
        """Stop a training whose loss, gradient or weights are no longer finite, keeping the last good checkpoint."""
        from ..rundir import write_json_atomic

        ckpt = self.latest_checkpoint()
        loss = ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
        if ckpt is not None:
            write_json_atomic(self.work / DIVERGED_FILE, {"step": step, "recipe_sha256": self.recipe.sha256})
            kept = (f"The last good checkpoint (step {ckpt.parent.name.removeprefix('step-').lstrip('0')}) is kept in "
                    f"'{self.work}': continue from it with --resume and the new --set.")
        else:
            kept = "No checkpoint was reached, so nothing is kept."
        what = what or "the loss or gradient is not finite"
        raise UserError(f"Training diverged at step {step} of {self.recipe.steps}: {what} ({loss}; gradient norm {grad_norm:.4g}) with learning_rate {lr:g}. Lower "
                        f"learning_rate (e.g. --set learning_rate={lr / 10:g}) or max_grad_norm (now "
                        f"{self.recipe.max_grad_norm:g}). {kept}")

    # ---- checkpoints and log

    @property
    def checkpoint_dir(self) -> Path:
        return self.work / "checkpoints"

    def _save_checkpoint(self, params, optimizer, scheduler, step: int) -> None:
        import torch

        if not self.accelerator.is_main_process:
            return
        state = {
            "step": step, "recipe_sha256": self.recipe.sha256,
            "params": {k: v.detach().float().cpu().clone() for k, v in params.items()},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "generator": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
        }
        final = self.checkpoint_dir / f"step-{step:08d}"
        tmp = self.checkpoint_dir / f".tmp-step-{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with open(tmp / CHECKPOINT_FILE, "wb") as f:  # a file object: a full disk's OSError stays in the chain
            torch.save(state, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(self.checkpoint_dir.glob("step-*"))[:-1]:  # keep the latest only
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoint_dir.glob("step-*/" + CHECKPOINT_FILE)) if self.checkpoint_dir.is_dir() else []
        return found[-1] if found else None

    def _load_checkpoint(self, params, optimizer, scheduler) -> int:
        import torch

        path = self.latest_checkpoint()
        if path is None:
            return 0
        state = torch.load(path, map_location="cpu", weights_only=True)
        changed = state["recipe_sha256"] != self.recipe.sha256
        if changed and not (self.work / DIVERGED_FILE).is_file():
            raise UserError(f"--resume: the checkpoint in '{path.parent}' was made with a different recipe "
                            f"(sha256 {state['recipe_sha256'][:12]}, now {self.recipe.sha256[:12]}). Resume with the "
                            f"same --set values, or delete '{self.work}' to start over.")
        with torch.no_grad():
            for k, p in params.items():
                if k not in state["params"] or state["params"][k].shape != p.shape:
                    raise UserError(f"--resume: the checkpoint in '{path.parent}' does not fit the new recipe "
                                    f"(parameter '{k}' changed shape); change only optimisation fields such as "
                                    f"learning_rate, or delete '{self.work}' to start over.")
                p.copy_(state["params"][k].to(p.device, p.dtype))
        if changed:  # after a divergence: the new recipe's optimiser starts afresh from the last good weights
            import warnings

            self.extra["recipe_changed_on_resume"] = {"from_recipe_sha256": state["recipe_sha256"],
                                                      "at_step": state["step"]}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # stepping the schedule to the checkpoint's step, not training
                for _ in range(state["step"]):
                    scheduler.step()
            (self.work / DIVERGED_FILE).unlink()
        else:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        self.gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.extra["resumed_from_step"] = state["step"]
        return int(state["step"])

    def _open_log(self, start: int):
        """A CSV writer of every loss term per step; on resume, rows after the checkpoint are dropped."""
        path = self.work / LOG_FILE
        kept = logged_rows(path, start) if start and path.is_file() else []
        state = {"writer": None, "file": None, "rows": kept}
        self.log_rows = list(kept)  # every row of the run, as logged (strings), across resumes

        def write(row):
            if row is None:
                if state["file"]:
                    state["file"].close()
                return
            self.log_rows.append(row)
            if not self.accelerator.is_main_process:
                return
            if state["writer"] is None:
                state["file"] = open(path, "w", newline="", encoding="utf-8")
                state["writer"] = csv.DictWriter(state["file"], fieldnames=list(row))
                state["writer"].writeheader()
                for old in state["rows"]:
                    state["writer"].writerow({k: old.get(k, "") for k in row})
            state["writer"].writerow(row)
            state["file"].flush()

        return write

    # ---- finishing

    def finish(self, files: list[str]) -> TrainResult:
        """Write training.json, drop checkpoints, rename ``OUT.partial`` to ``OUT``."""
        from .. import __version__
        from ..models import file_sha256
        from ..provenance import device_info, git_commit, now_iso, package_versions
        from ..rundir import write_json_atomic

        acc = self.accelerator
        acc.wait_for_everyone()
        training = {
            "method": self.method, "subject": self.subject.name, "trigger": self.subject.trigger,
            "class_noun": self.subject.class_noun,
            "protocol": {"name": self.protocol.name, "version": self.protocol.version, "sha256": self.protocol.sha256},
            "protocol_sha256": self.protocol.sha256,
            "base_model": self.base_identity,
            "recipe": self.recipe.to_dict(), "recipe_sha256": self.recipe.sha256, "recipe_sources": self.recipe_sources,
            "seed": self.recipe.seed, "steps": self.recipe.steps,
            "allow_prompt_overlap": self.protocol.allow_prompt_overlap,
            "captions": self.captions.with_trigger if self.captions else [],
            "final_loss": self.final_losses,
            "duration_s": round(time.perf_counter() - self.t0, 2),
            "start_time": self.start_time, "end_time": now_iso(),
            "num_processes": acc.num_processes, "device": device_info(str(acc.device)),
            "kps_bench_version": __version__, "packages": package_versions(), "git_commit": git_commit(),
            **self.extra,
        }
        if acc.is_main_process:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
            training["files"] = {f: file_sha256(self.work / f) for f in files}
            write_json_atomic(self.work / TRAINING_JSON, training)
            if self.out.exists():
                raise UserError(f"--out '{self.out}' appeared while training; the result is kept in '{self.work}'.")
            os.replace(self.work, self.out)
        acc.wait_for_everyone()
        return TrainResult(self.out, training)


@contextlib.contextmanager
def _no_sync_all(acc, models):
    with contextlib.ExitStack() as stack:
        for m in models:
            stack.enter_context(acc.no_sync(m))
        yield


def to_device(module, device, dtype=None):
    """Move a module; cast only when the dtype changes (diffusers warns on a no-op ``to(dtype)``)."""
    import torch

    module.to(device)
    if dtype is not None and dtype != torch.float32:
        module.to(dtype=dtype)
    return module


class TrainingInterrupted(Exception):
    """Raised by ``stop_after`` (tests) to simulate an interruption right after a checkpoint."""

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step}")
        self.step = step


def logged_rows(path: Path, upto: int) -> list[dict]:
    """The complete rows of the loss log ``path`` with step <= ``upto``. A row cut short (a full disk, a kill) lacks its
    line end, and may lack fields or hold a shortened number (step 12 cut to 1), so it is dropped."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if line.endswith("\n")]
    rows = csv.DictReader(lines)
    return [row for row in rows if len(row) == len(rows.fieldnames) and None not in row.values()
            and row["step"].isdigit() and int(row["step"]) <= upto]


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def refuse_sdxl(protocol: Protocol, pipeline_class: type | None) -> None:
    """Stop with a UserError when the base's pipeline class (None: not known) is SDXL, which no trainer trains."""
    from ..family import SDXL, family_of

    if pipeline_class is not None and family_of(pipeline_class) == SDXL:
        raise UserError(f"Base model '{protocol.base_model}' is SDXL ({pipeline_class.__name__}), and train-baseline "
                        f"does not train SDXL: its trainers ({', '.join(METHODS)}) train Stable Diffusion 1.x/2.x "
                        f"pipelines (UNet, VAE, one CLIP text encoder). Train SDXL adapters with another tool (e.g. "
                        f"diffusers' train_dreambooth_lora_sdxl.py) and evaluate them with `kps-bench run --adapter`, "
                        f"which loads SDXL LoRAs, two-encoder textual inversions and fine-tuned SDXL pipelines; or "
                        f"train on an SD 1.x/2.x base (the protocol's base_model).")


def make_trainer(method: str, protocol: Protocol, subject_name: str, out, device: str = "auto", overrides=(),
                 resume: bool = False, stop_after: int | None = None, seed: int | None = None) -> Trainer:
    """Validate every input (method, base model family, subject, references, recipe, output folder) before anything
    is written or loaded; the caller has checked that ``out`` can be written and holds its lock. ``seed`` overrides
    the recipe's."""
    from ..family import declared_pipeline_class
    from ..run import reference_images

    if method not in METHODS:
        raise UserError(f"Unknown training method '{method}'. Known methods: {', '.join(METHODS)}.")
    refuse_sdxl(protocol, declared_pipeline_class(protocol.resolve(protocol.base_model, "pipeline")))
    subject = protocol.subject(subject_name)
    reference_images(protocol, subject)
    recipe, sources = load_recipe(method, protocol, overrides, seed)
    out = Path(out).expanduser()
    work = partial_dir(out)
    if out.exists():
        raise UserError(f"--out '{out}' already exists; kps-bench does not overwrite a trained adapter. Choose another "
                        f"--out or delete it.")
    if work.exists() and not resume:
        raise UserError(f"'{work}' holds an interrupted training run; pass --resume to continue it, or delete it to "
                        f"start over.")
    return Trainer(method, protocol, subject, recipe, sources, out, work, device, resume, stop_after)


@contextlib.contextmanager
def work_folder(trainer: Trainer):
    """Create ``OUT.partial``; on a user error before the first checkpoint, remove it again."""
    created = not trainer.work.exists()
    trainer.work.mkdir(parents=True, exist_ok=True)
    try:
        yield trainer.work
    except BaseException as e:
        if isinstance(e, TrainingInterrupted):
            raise
        if created and trainer.latest_checkpoint() is None and trainer.work.exists():
            shutil.rmtree(trainer.work, ignore_errors=True)
        raise

