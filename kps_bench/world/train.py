"""Training of every model of the shapes world (CPU, fixed seeds).

Each ``train_*`` function takes numpy data and a ``scale`` (1.0 = the shipped budget; smaller for
smoke tests) and returns a trained torch module. ``build.py`` orchestrates them and saves.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .render import BASE_COLOURS, SHAPES, Factors, caption, caption_claims, claims_matrix, labels_of

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's default (OpenAI) normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_LEN = 24  # tokens (tokenizer model_max_length == text encoder max_position_embeddings)
LATENT_CH = 4
PROBE_SHIFT_P = 0.35  # fraction of probe batches with a colour shift (0.5 cost held-out shape accuracy)
PROBE_COLOUR_SHIFT = 0.12  # probe colour augmentation: up to ~31 RGB units per channel (palette colours are >= 82 apart)


def _progress():
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())


def _tick(pb, task, step, steps, info):
    """Advance a progress bar; without a terminal, also print a line every 5%."""
    import sys

    pb.update(task, completed=step, info=info)
    # called every 20 steps: print on the call that enters each 5% bucket
    if not sys.stderr.isatty() and steps >= 20 and step % max(1, steps // 20) < 20:
        desc = pb.tasks[task].description if hasattr(pb, "tasks") else ""
        print(f"  {desc} {step}/{steps} {info} ({time.strftime('%H:%M:%S')})", file=sys.stderr, flush=True)


def _to_float(images: np.ndarray):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def _bf16():
    """bfloat16 autocast for a training forward pass (weights, gradients and optimiser stay float32).
    Used where it measured faster on the 2-core AVX512-BF16 build machine: UNet + text encoder 22%,
    VAE 18%, probe 2x per step; CLIP's step is slower under it and stays float32."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16)


def _cosine_lr(opt, step, total, base, warmup=100):
    if step < warmup:
        lr = base * (step + 1) / warmup
    else:
        lr = base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        lr = max(lr, base * 0.05)
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


# -------------------------------------------------------------------------------------- VAE
def vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                latent_channels=LATENT_CH, layers_per_block=1, norm_num_groups=32, sample_size=32)


def train_vae(images: np.ndarray, steps: int, seed: int, batch: int = 64, log=print, lr: float = 1e-3,
              latent_noise: float = 0.1):
    """Train the VAE as a near-deterministic autoencoder: the decoder sees the posterior mean plus
    small Gaussian noise (``latent_noise``, which also makes it robust to imperfect diffusion latents),
    with a light penalty on the latent norm instead of the (very slow to converge) sampled-KL setup."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    g = np.random.default_rng(seed)
    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    x_all = images
    vae.train()
    with _progress() as pb:
        t = pb.add_task("VAE", total=steps, info="")
        for step in range(steps):
            _cosine_lr(opt, step, steps, lr)
            idx = g.integers(0, len(x_all), batch)
            x = _to_float(x_all[idx]) * 2 - 1
            with _bf16():
                post = vae.encode(x).latent_dist
                z = post.mean.float()
                z = z + latent_noise * z.detach().std() * torch.randn_like(z)
                rec = vae.decode(z).sample.float()
            loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * post.mean.pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 20 == 0:
                _tick(pb, t, step, steps, f"loss {loss.item():.4f}")
        pb.update(t, completed=steps)
    vae.eval()
    # scaling factor: latents of unit variance
    with torch.no_grad():
        x = _to_float(x_all[:2000]) * 2 - 1
        z = torch.cat([vae.encode(x[i:i + 100]).latent_dist.mean for i in range(0, len(x), 100)])
    sf = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=sf)
    set_posterior_std(vae, latent_noise / sf)
    log(f"VAE scaling factor {sf:.4f}, posterior std {latent_noise / sf:.4f}")
    return vae


def set_posterior_std(vae, sigma: float) -> None:
    """Make the posterior ``N(mean, sigma^2)``: the noise the decoder was trained with.

    Training only ever used the posterior mean, so the log-variance half of ``quant_conv`` is
    untrained (std ~ 1, half the latents' spread); anything that samples ``latent_dist`` (the UNet
    here, every adapter trainer later) would otherwise learn from heavily noised latents.
    """
    import torch

    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[c:].zero_()
        vae.quant_conv.bias[c:].fill_(2 * math.log(sigma))


def vae_encode(vae, images: np.ndarray, batch: int = 100):
    """Posterior mean and std of the latents (unscaled)."""
    import torch

    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            d = vae.encode(_to_float(images[i:i + batch]) * 2 - 1).latent_dist
            means.append(d.mean)
            stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def vae_reconstruct(vae, images: np.ndarray, batch: int = 100) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = _to_float(images[i:i + batch]) * 2 - 1
            r = vae.decode(vae.encode(x).latent_dist.mean).sample
            out.append(((r.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


# ------------------------------------------------------------------------------------ probe
def _blur_noise(x, g: np.random.Generator):
    """Random mild blur and noise (makes the probe robust to decoder artefacts)."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    sig = torch.from_numpy(g.uniform(0.0, 0.9, b).astype(np.float32))
    k = torch.arange(-2, 3).float()
    w = torch.exp(-(k[None] ** 2) / (2 * sig[:, None].clamp(min=1e-3) ** 2))
    w = w / w.sum(1, keepdim=True)  # (b,5)
    xp = F.pad(x, (2, 2, 2, 2), mode="replicate")
    # separable blur per sample
    xs = sum(w[:, i].view(b, 1, 1, 1) * xp[:, :, :, i:i + 32] for i in range(5))
    xs = sum(w[:, i].view(b, 1, 1, 1) * xs[:, :, i:i + 32, :] for i in range(5))
    noise = torch.from_numpy(g.normal(0, 1, x.shape).astype(np.float32)) * torch.from_numpy(
        g.uniform(0, 0.04, (b, 1, 1, 1)).astype(np.float32))
    return (xs + noise).clamp(0, 1)


def _colour_shift(x, g: np.random.Generator, max_shift: float = PROBE_COLOUR_SHIFT):
    """Shift each image's RGB channels by uniform offsets in [-max_shift, max_shift] (x in [0, 1]).

    Generated images drift a few tens of RGB units from the palette; without this the probe puts the
    boundary between neighbouring colours (purple, magenta) almost at the palette colour itself."""
    import torch

    shift = torch.from_numpy(g.uniform(-max_shift, max_shift, (x.shape[0], 3, 1, 1)).astype(np.float32))
    return (x + shift).clamp_(0.0, 1.0)


def train_probe(images: np.ndarray, fs: list[Factors], steps: int, seed: int, recon: np.ndarray | None = None,
                batch: int = 128, lr: float = 2e-3):
    import torch
    import torch.nn.functional as F

    from .probe import build_probe

    torch.manual_seed(seed)
    g = np.random.default_rng(seed)
    m = build_probe()
    labels = {k: torch.from_numpy(v) for k, v in labels_of(fs).items()}
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=1e-4)
    m.train()
    with _progress() as pb:
        t = pb.add_task("probe", total=steps, info="")
        for step in range(steps):
            _cosine_lr(opt, step, steps, lr)
            if recon is not None and g.random() < 0.5:
                idx = g.integers(0, len(recon), batch)
                x = _to_float(recon[idx])
            else:
                idx = g.integers(0, len(images), batch)
                x = _to_float(images[idx])
            if g.random() < 0.5:
                x = _blur_noise(x, g)
            if g.random() < PROBE_SHIFT_P:
                x = _colour_shift(x, g)
            with _bf16():
                out = m(x)
            loss = sum(F.cross_entropy(out[k].float(), labels[k][idx]) for k in out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 20 == 0:
                _tick(pb, t, step, steps, f"loss {loss.item():.3f}")
        pb.update(t, completed=steps)
    m.eval()
    return m


# ------------------------------------------------------------------------------ text + UNet
def text_encoder_config() -> dict:
    return dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=TEXT_LEN, projection_dim=64,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def unet_config() -> dict:
    return dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 96),
                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                attention_head_dim=32, norm_num_groups=32)


def scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


class _Ema:
    def __init__(self, module, decay):
        import copy

        self.decay = decay
        self.shadow = copy.deepcopy(module).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    def update(self, module, step):
        import torch

        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(self.shadow.parameters()), [p.detach() for p in module.parameters()], 1 - d)


def train_t2i(latent_mean, latent_std, fs: list[Factors], tokenizer, scaling_factor: float, steps: int,
              seed: int, batch: int = 112, p_uncond: float = 0.1, base_lr: float = 5e-4,
              warmup: int = 200, snr_gamma: float | None = 5.0):
    """Jointly train a CLIPTextModel and a UNet2DConditionModel from scratch with the epsilon
    objective and caption dropout ``p_uncond``.

    ``snr_gamma``: Min-SNR loss weighting (Hang et al. 2023), ``min(SNR, gamma) / SNR`` per sample,
    which converges several times faster than the plain epsilon MSE; ``None`` for the plain MSE."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    g = np.random.default_rng(seed)
    text = CLIPTextModel(CLIPTextConfig(**text_encoder_config()))
    unet = UNet2DConditionModel(**unet_config())
    sched = DDPMScheduler(**{k: v for k, v in scheduler_config().items() if k != "set_alpha_to_one"})
    params = [{"params": unet.parameters(), "lr_mult": 1.0}, {"params": text.parameters(), "lr_mult": 1.0}]
    opt = torch.optim.AdamW(params, lr=base_lr, weight_decay=1e-2, fused=True)
    ema_u, ema_t = _Ema(unet, 0.999), _Ema(text, 0.999)
    tok_cache: dict[str, list[int]] = {}

    def tokenize(caps):
        miss = [c for c in set(caps) if c not in tok_cache]
        if miss:
            ids = tokenizer(miss, padding="max_length", max_length=TEXT_LEN, truncation=True).input_ids
            tok_cache.update(zip(miss, ids))
        return torch.tensor([tok_cache[c] for c in caps])

    unet.train()
    text.train()
    alphas = sched.alphas_cumprod
    # the attention sequences here are 16-24 tokens long: for them the math kernel is faster on CPU
    # than the flash kernel SDPA would pick
    with _progress() as pb, sdpa_kernel(SDPBackend.MATH):
        t = pb.add_task("UNet + text encoder", total=steps, info="")
        for step in range(steps):
            _cosine_lr(opt, step, steps, base_lr, warmup=warmup)
            idx = g.integers(0, len(fs), batch)
            caps = [caption(fs[i], g) if g.random() >= p_uncond else "" for i in idx]
            ids = tokenize(caps)
            z = (latent_mean[idx] + latent_std[idx] * torch.randn_like(latent_mean[idx])) * scaling_factor
            noise = torch.randn_like(z)
            ts = torch.from_numpy(g.integers(0, 1000, batch)).long()
            zt = sched.add_noise(z, noise, ts)
            with _bf16():
                enc = text(ids).last_hidden_state
                pred = unet(zt, ts, encoder_hidden_states=enc).sample.float()
            loss = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
            if snr_gamma is not None:
                snr = alphas[ts] / (1 - alphas[ts])
                loss = loss * snr.clamp(max=snr_gamma) / snr
            loss = loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text.parameters()), 1.0)
            opt.step()
            ema_u.update(unet, step)
            ema_t.update(text, step)
            if step % 20 == 0:
                _tick(pb, t, step, steps, f"loss {loss.item():.4f}")
        pb.update(t, completed=steps)
    return ema_t.shadow, ema_u.shadow


# ------------------------------------------------------------------------------------ CLIP
def clip_config() -> dict:
    return {
        "embed_dim": 64,
        # a ModifiedResNet image tower (layers given as a list): learns shapes far faster than a ViT here
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 64},
        "text_cfg": {"context_length": TEXT_LEN, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
    }


CLIP_MODEL_NAME = "shapes-world-clip"


def register_clip_config(cfg: dict | None = None, name: str = CLIP_MODEL_NAME) -> str:
    from open_clip import factory

    factory._MODEL_CONFIGS[name] = dict(cfg or clip_config())
    return name


def clip_resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 images resized to the CLIP tower's input size with PIL bicubic, exactly as open_clip's
    preprocessing does at scoring time."""
    if images.shape[1] == size:
        return images
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])


def train_clip(images: np.ndarray, fs: list[Factors], steps: int, seed: int, batch: int = 256,
               lr: float = 1e-3, warmup: int = 200):
    import open_clip
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    g = np.random.default_rng(seed)
    name = register_clip_config()
    model = open_clip.create_model(name)
    images = clip_resize(images, clip_config()["vision_cfg"]["image_size"])
    tokenizer = open_clip.get_tokenizer(name)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    tok_cache: dict = {}
    model.train()
    with _progress() as pb:
        t = pb.add_task("CLIP", total=steps, info="")
        for step in range(steps):
            _cosine_lr(opt, step, steps, lr, warmup=warmup)
            idx = g.integers(0, len(images), batch)
            caps = [caption(fs[i], g, keep=0.6) for i in idx]
            miss = [c for c in set(caps) if c not in tok_cache]
            if miss:
                tok_cache.update(zip(miss, tokenizer(miss)))
            ids = torch.stack([tok_cache[c] for c in caps])
            x = (_to_float(images[idx]) - mean) / std
            img_f = F.normalize(model.encode_image(x), dim=-1)
            txt_f = F.normalize(model.encode_text(ids), dim=-1)
            logits = model.logit_scale.exp().clamp(max=100) * img_f @ txt_f.t()
            # a caption is a positive for every image of the batch it describes correctly ("a star" for
            # all stars), not only for its own image: no false negatives among the short captions
            pos = torch.from_numpy(claims_matrix([caption_claims(c) for c in caps], [fs[i] for i in idx])).float()
            tgt_i = pos / pos.sum(1, keepdim=True)
            tgt_t = pos.t() / pos.t().sum(1, keepdim=True)
            loss = 0.5 * (-(tgt_i * F.log_softmax(logits, 1)).sum(1).mean()
                          - (tgt_t * F.log_softmax(logits.t(), 1)).sum(1).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 20 == 0:
                _tick(pb, t, step, steps, f"loss {loss.item():.3f}")
        pb.update(t, completed=steps)
    model.eval()
    return model


# ------------------------------------------------------------------------------------ DINO
DINO_MEAN = (0.5, 0.5, 0.5)
DINO_STD = (0.5, 0.5, 0.5)


def dino_config() -> dict:
    return dict(image_size=32, patch_size=8, num_channels=3, hidden_size=128, num_hidden_layers=4,
                num_attention_heads=4, intermediate_size=512, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, qkv_bias=True)


DINO_SLOT_RECIPE = (
    "a ViT trained by multi-view instance discrimination (symmetric InfoNCE, temperature 0.1, batch 192), not by "
    "DINO. The views of one object are re-renders of it by the world's renderer: two at other positions and "
    "rotations, one of them on a random background 60% of the time, and one zoomed in (centred, 1.3x larger, "
    "the pattern at its own scale); each view is then mildly blurred and noised. The loss pairs the first view "
    "with the second and with the zoomed one. No factor label is used. Why: a DINO trained on this domain learns "
    "only what its two views share at initialisation (mostly the background) and collapses otherwise (the v1 "
    "diagnosis in the limitations); intra-class diversity and the `dino` identity need colour, pattern, "
    "background and size, which this objective keeps.")


def _view(fs: list[Factors], g: np.random.Generator, swap_background: float = 0.0, zoom: float = 1.0):
    """Re-render objects at a random position and rotation (zoomed in and centred when ``zoom`` > 1), on a
    random background with probability ``swap_background``; float ``[b, 3, 32, 32]`` in [0, 1], blurred and
    noised like ``_blur_noise``."""
    import dataclasses

    from .render import BACKGROUNDS, RES, SIZE_RADIUS, render_many

    views = []
    for f in fs:
        bg = BACKGROUNDS[g.integers(len(BACKGROUNDS))] if g.random() < swap_background else f.background
        if zoom > 1:
            cx, cy = g.uniform(RES / 2 - 2, RES / 2 + 2, 2)
        else:
            r = SIZE_RADIUS[f.size] * f.radius_jitter + 1.0
            cx, cy = g.uniform(r, RES - r, 2) if RES - r > r else (RES / 2, RES / 2)
        views.append(dataclasses.replace(f, background=bg, cx=float(cx), cy=float(cy),
                                         rotation=float(g.uniform(-25, 25)), radius_jitter=f.radius_jitter * zoom))
    return _blur_noise(_to_float(render_many(views)), g)


def train_dino_slot(fs: list[Factors], steps: int, seed: int, batch: int = 192, lr: float = 1e-3,
                    temperature: float = 0.1, swap_background: float = 0.6, zoom: float = 1.3):
    """The encoder in DINO's slot (``DINO_SLOT_RECIPE``): a ``ViTModel`` whose CLS token is the feature,
    trained on views re-rendered from the objects ``fs``. Returns the ViT."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    g = np.random.default_rng(seed)
    vit = ViTModel(ViTConfig(**dino_config()), add_pooling_layer=False)
    d = dino_config()["hidden_size"]
    head = nn.Sequential(nn.Linear(d, 256), nn.GELU(), nn.Linear(256, 64))
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    mean = torch.tensor(DINO_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DINO_STD).view(1, 3, 1, 1)

    def nce(a, b):
        logits = a @ b.t() / temperature
        t = torch.arange(len(a))
        return 0.5 * (F.cross_entropy(logits, t) + F.cross_entropy(logits.t(), t))

    vit.train()
    with _progress() as pb:
        t = pb.add_task("DINO slot", total=steps, info="")
        for step in range(steps):
            _cosine_lr(opt, step, steps, lr, warmup=min(100, steps // 10))
            objs = [fs[i] for i in g.integers(0, len(fs), batch)]
            x = torch.cat([_view(objs, g), _view(objs, g, swap_background), _view(objs, g, zoom=zoom)])
            with _bf16():
                h = vit(pixel_values=(x - mean) / std).last_hidden_state[:, 0]
                z = F.normalize(head(h).float(), dim=-1)
            z1, z2, z3 = z.chunk(3)
            loss = nce(z1, z2) + nce(z1, z3)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 20 == 0:
                _tick(pb, t, step, steps, f"loss {loss.item():.3f}")
        pb.update(t, completed=steps)
    return vit.eval()


# --------------------------------------------------------------------------- evaluation helpers
def _embed_normalised(encode, images: np.ndarray, mean, std, batch: int):
    """L2-normalised ``encode((x - mean) / std)`` over batches of uint8 images ``[n, H, W, 3]``."""
    import torch
    import torch.nn.functional as F

    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.cat([F.normalize(encode((_to_float(images[i:i + batch]) - mean) / std), dim=-1)
                          for i in range(0, len(images), batch)])


def clip_embed_images(model, images: np.ndarray, batch: int = 200):
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return _embed_normalised(model.encode_image, clip_resize(images, size), CLIP_MEAN, CLIP_STD, batch)


def dino_embed_images(vit, images: np.ndarray, batch: int = 200):
    return _embed_normalised(lambda x: vit(pixel_values=x).last_hidden_state[:, 0], images, DINO_MEAN, DINO_STD, batch)


def knn_accuracy(train_f, train_y, test_f, test_y, k: int = 20) -> float:
    import torch

    sim = test_f @ train_f.t()
    top = sim.topk(k, dim=1)
    votes = torch.zeros(len(test_f), int(train_y.max()) + 1)
    w = (top.values / 0.07).exp()
    votes.scatter_add_(1, train_y[top.indices], w)
    return float((votes.argmax(1) == test_y).float().mean())


def clip_zero_shot(model, images: np.ndarray, fs: list[Factors]) -> dict:
    import open_clip
    import torch
    import torch.nn.functional as F

    tok = open_clip.get_tokenizer(register_clip_config())
    imf = clip_embed_images(model, images)
    with torch.no_grad():
        sh = F.normalize(model.encode_text(tok([f"a {s}" for s in SHAPES])), dim=-1)
        col = []
        for c in BASE_COLOURS:
            e = F.normalize(model.encode_text(tok([f"a {c} {s}" for s in SHAPES])), dim=-1).mean(0)
            col.append(F.normalize(e, dim=-1))
        col = torch.stack(col)
    ys = torch.tensor([SHAPES.index(f.shape) for f in fs])
    yc = torch.tensor([BASE_COLOURS.index(f.colour) for f in fs])
    return {"shape": float(((imf @ sh.t()).argmax(1) == ys).float().mean()),
            "colour": float(((imf @ col.t()).argmax(1) == yc).float().mean())}
