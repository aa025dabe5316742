"""Training data: the subject's reference images as cached VAE latents, the captions, and every random draw.

The references are encoded once by the frozen VAE; each draw samples the cached posterior, crops and flips it in latent
space. Every random draw (image, caption, caption dropout, flip, crop, latent sample, noise, timestep) comes from one
CPU ``torch.Generator`` per process (:class:`Draws`), seeded from the recipe's seed and the process index, whose state
each process checkpoints for itself (:mod:`kps_bench.train.checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..protocol import Protocol, Subject, expand_prompt
from .recipe import Recipe, caption_templates


@dataclass
class Batch:
    """One training batch: everything random is drawn from the process's generator in a fixed order."""

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


def encode_latents(vae, pixels, latent_size: int, device) -> LatentCache:
    """Encode images once with the frozen VAE (on the training device), keep the posteriors on the CPU."""
    vae.to(device)
    try:
        return LatentCache(vae, pixels, latent_size, vae.config.scaling_factor,
                           getattr(vae.config, "shift_factor", None))
    finally:
        vae.to("cpu")


class Draws:
    """The training batches of one process: ``batch_size`` (its share of the recipe's batch) images of ``latents``,
    captions, noise and timesteps per call, all drawn from one CPU generator seeded from ``recipe.seed`` and
    ``process_index``."""

    def __init__(self, recipe: Recipe, captions: Captions, latents: LatentCache, noise_scheduler, device,
                 batch_size: int, process_index: int):
        import torch

        self.recipe, self.captions, self.latents = recipe, captions, latents
        self.noise_scheduler, self.device, self.batch_size = noise_scheduler, device, batch_size
        self.generator = torch.Generator("cpu").manual_seed(recipe.seed + 1_000_003 * process_index)

    def sample(self, n: int | None = None, cache: LatentCache | None = None,
               image_captions: list[int] | None = None) -> Batch:
        """Draw ``n`` (default: this process's batch) (image, caption, flip, crop, latent, noise, timestep) tuples.

        ``image_captions`` fixes each image's caption (DreamBooth class images); otherwise captions are drawn.
        """
        import torch

        n = n or self.batch_size
        cache = cache or self.latents
        g, r = self.generator, self.recipe
        zs, img_idx, cap_idx = [], [], []
        for _ in range(n):
            i = int(torch.randint(0, len(cache), (1,), generator=g))
            if image_captions is None:
                c = int(torch.randint(0, len(self.captions.templates), (1,), generator=g))
                # no draw at all without dropout: the random stream (and so every result) stays as before
                if r.caption_dropout > 0 and float(torch.rand((1,), generator=g)) < r.caption_dropout:
                    c = len(self.captions.templates)  # the empty prompt
            else:
                c = image_captions[i]
            flip = r.random_flip and bool(torch.rand((1,), generator=g) < 0.5)
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
