"""``kps-bench world check``: measure the quality gates of a shapes world."""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from .render import BACKGROUNDS, BASE_COLOURS, COLOURS, SHAPES, render_many, sample_dataset, sample_factors

HELDOUT_SEED = 3
BANK_SEED = 4
GEN_SEED = 5
CEILING_SEED = 6
STEPS, GUIDANCE, BATCH = 25, 7.5, 32


def load_pipeline(world: Path, dtype: str = "float32"):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(world / "pipeline"), dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_clip(world: Path):
    """The world's open_clip model (its registered config + checkpoint), in eval mode."""
    import open_clip

    from . import train as T

    name = T.register_clip_config(json.loads((world / "clip" / "open_clip_config.json").read_text()))
    return open_clip.create_model(name, pretrained=str(world / "clip" / "open_clip_model.safetensors")).eval()


def generate(pipe, prompts: list[str], seed: int, batch: int = BATCH, steps: int = STEPS,
             guidance: float = GUIDANCE) -> tuple[np.ndarray, float]:
    """uint8 images (n,32,32,3) and seconds spent per image (batches after the first)."""
    import torch

    out, times = [], []
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed + i)
        t = time.time()
        r = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=g,
                 output_type="np").images
        times.append((time.time() - t, len(r)))
        out.append((np.clip(r, 0, 1) * 255).round().astype(np.uint8))
    rest = times[1:] or times
    per = sum(t for t, _ in rest) / sum(n for _, n in rest)
    return np.concatenate(out), per


def _norm_entropy(labels: list[str], k: int) -> float:
    c = Counter(labels)
    n = sum(c.values())
    h = -sum(v / n * math.log(v / n) for v in c.values())
    return h / math.log(k)


def check(world: str | os.PathLike | None = None, n: int = 200, json_path=None, log=print,
          threads: int | None = 2) -> dict:
    import torch
    from transformers import ViTModel

    from . import WORLD_DIR
    from . import train as T
    from .build import wide_dataset
    from .probe import load_probe, predict
    from .render import labels_of
    from .subjects import SUBJECTS

    if threads:
        torch.set_num_threads(threads)
    world = Path(world) if world else WORLD_DIR
    t0 = time.time()
    gates: list[dict] = []

    def gate(name, value, thr, op=">=", n_img=n):
        ok = value >= thr if op == ">=" else value <= thr
        gates.append({"gate": name, "value": round(float(value), 4), "threshold": thr, "op": op,
                      "passed": bool(ok), "n": n_img})

    # probe on held-out renders (every colour, subject looks included)
    imgs, fs = wide_dataset(n, HELDOUT_SEED + 100)
    pr = predict(imgs, world / "probe")
    for k, thr in [("shape", 0.98), ("colour", 0.95), ("pattern", 0.95), ("background", 0.98)]:
        acc = np.mean([p[k] == getattr(f, k) for p, f in zip(pr, fs)])
        gate(f"probe {k} accuracy (held-out renders)", acc, thr)

    # CLIP zero-shot on held-out renders of the base distribution
    himgs, hfs, _ = sample_dataset(n, HELDOUT_SEED, with_captions=False)
    clip = load_clip(world)
    zs = T.clip_zero_shot(clip, himgs, hfs)
    gate("CLIP zero-shot shape", zs["shape"], 0.95)
    gate("CLIP zero-shot colour", zs["colour"], 0.90)

    # DINO k-NN (k=20), bank of 2000 renders
    vit = ViTModel.from_pretrained(str(world / "dino"), torch_dtype=torch.float32).eval()
    bimgs, bfs, _ = sample_dataset(2000, BANK_SEED, with_captions=False)
    bf = T.dino_embed_images(vit, bimgs)
    hf = T.dino_embed_images(vit, himgs)
    acc = T.knn_accuracy(bf, torch.from_numpy(labels_of(bfs)["shape"]), hf,
                         torch.from_numpy(labels_of(hfs)["shape"]), k=20)
    gate("DINO k-NN (k=20) shape", acc, 0.90)
    del vit

    # generations of the base model
    pipe = load_pipeline(world)
    g = np.random.default_rng(GEN_SEED)
    full = [(BASE_COLOURS[g.integers(8)], SHAPES[g.integers(6)], BACKGROUNDS[g.integers(5)]) for _ in range(n)]
    prompts = [f"a {c} {s} on a {b} background" for c, s, b in full]
    gimgs, sec = generate(pipe, prompts, GEN_SEED)
    gp = predict(gimgs, world / "probe")
    gate("base full prompts: shape", np.mean([p["shape"] == s for p, (c, s, b) in zip(gp, full)]), 0.90)
    gate("base full prompts: colour", np.mean([p["colour"] == c for p, (c, s, b) in zip(gp, full)]), 0.80)
    gate("base full prompts: background", np.mean([p["background"] == b for p, (c, s, b) in zip(gp, full)]), 0.80)

    n_cls = max(n, 6 * math.ceil(n / 6))
    cls = [SHAPES[i % 6] for i in range(n_cls)]
    cimgs, sec2 = generate(pipe, [f"a {s}" for s in cls], GEN_SEED + 7919)
    cp = predict(cimgs, world / "probe")
    gate("base class prompts: shape", np.mean([p["shape"] == s for p, s in zip(cp, cls)]), 0.90, n_img=n_cls)
    # normalised by the log of the number of colour labels the probe can give (11), so it lies in [0, 1]
    ent = _norm_entropy([p["colour"] for p in cp], len(COLOURS))
    per_shape = [_norm_entropy([p["colour"] for p, s in zip(cp, cls) if s == sh], len(COLOURS))
                 for sh in SHAPES]
    gate("base class prompts: colour entropy (normalised)", ent, 0.70, n_img=n_cls)
    leak_rates = {}
    for s in SUBJECTS:
        sel = [p for p, c in zip(cp, cls) if c == s.class_noun]
        leak_rates[s.name] = float(np.mean([p["colour"] == s.colour and p["pattern"] == s.pattern for p in sel]))
    any_sig = np.mean([any(p["colour"] == s.colour and p["pattern"] == s.pattern for s in SUBJECTS) for p in cp])
    gate("base class prompts: subject signature look", any_sig, 0.05, op="<=", n_img=n_cls)

    ceilings = identity_ceilings(clip, pipe.vae, world, n)
    del clip

    # speed: batch 32, 25 steps, guidance 7.5
    per = (sec + sec2) / 2
    gate("generation speed (images/s, batch 32, 25 steps, CFG)", 1.0 / per, 10.0, n_img=n + n_cls)

    result = {
        "world": str(world),
        "n": n,
        "gates": gates,
        "all_passed": all(x["passed"] for x in gates),
        "details": {
            "clip_zero_shot": zs,
            "class_prompt_colour_entropy_per_shape": dict(zip(SHAPES, [round(e, 4) for e in per_shape])),
            "class_prompt_colour_counts": dict(Counter(p["colour"] for p in cp)),
            "signature_rate_per_subject_on_its_class": leak_rates,
            "identity_ceilings": ceilings,
            "images_per_second": round(1.0 / per, 2),
            "threads": torch.get_num_threads(),
        },
        "duration_s": round(time.time() - t0, 1),
        "measured_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    print_table(result, log)
    log(ceilings_text(ceilings))
    if json_path:
        from kps_bench.rundir import write_json_atomic

        write_json_atomic(json_path, result)
    return result


def identity_ceilings(clip, vae, world: Path, n: int) -> dict:
    """What the benchmark's ``identity`` and the ground truth can reach on this world, per subject.

    ``identity`` ((1 + cos) / 2 of CLIP embeddings against the subject's shipped references, the metric's
    definition) of ``n`` fresh renders of the subject, of their VAE reconstructions (every generated
    image passes through the VAE decoder: about what a perfect adapter reaches) and of ``n`` renders of
    random members of its class (what an adapter that learned nothing scores); and the probe's
    signature rate on the renders and on their reconstructions (about the most ground-truth identity
    can reach)."""
    from PIL import Image

    from .. import metrics as M
    from . import train as T
    from .probe import predict
    from .subjects import SUBJECTS, subject_factors

    g = np.random.default_rng(CEILING_SEED)
    out = {}
    for s in SUBJECTS:
        refs = np.stack([np.asarray(Image.open(p).convert("RGB"))
                         for p in sorted((world / "subjects" / s.name).glob("ref_*.png"))])
        ref_f = T.clip_embed_images(clip, refs)
        renders = render_many([subject_factors(s, g) for _ in range(n)])
        recon = T.vae_reconstruct(vae, renders)
        members = render_many([sample_factors(g, shapes=[s.class_noun]) for _ in range(n)])

        def identity(images):
            return round(float(M.similarity01(M.cosine_matrix(T.clip_embed_images(clip, images), ref_f)).mean()), 4)

        def signature(images):
            return round(float(np.mean([p["colour"] == s.colour and p["pattern"] == s.pattern
                                        for p in predict(images, world / "probe")])), 4)

        out[s.name] = {"identity_renders": identity(renders), "identity_vae_reconstructions": identity(recon),
                       "identity_class_members": identity(members), "signature_renders": signature(renders),
                       "signature_vae_reconstructions": signature(recon), "n": n}
    return out


def ceilings_text(ceilings: dict) -> str:
    rows = ["identity ceilings (CLIP identity of renders / VAE reconstructions / random class members; "
            "probe signature rate of renders / reconstructions):"]
    for name, c in ceilings.items():
        rows.append(f"  {name:<14} identity {c['identity_renders']:.3f} / {c['identity_vae_reconstructions']:.3f} / "
                    f"{c['identity_class_members']:.3f}   signature {c['signature_renders']:.3f} / "
                    f"{c['signature_vae_reconstructions']:.3f}")
    return "\n".join(rows)


def print_table(result: dict, log=print) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"shapes-world quality gates (n={result['n']})")
        for c in ["gate", "value", "threshold", "n", "pass"]:
            t.add_column(c)
        for g in result["gates"]:
            t.add_row(g["gate"], f"{g['value']:.3f}", f"{g['op']} {g['threshold']}", str(g["n"]),
                      "[green]PASS[/green]" if g["passed"] else "[red]FAIL[/red]")
        Console().print(t)
    except Exception:  # pragma: no cover
        for g in result["gates"]:
            log(f"{g['gate']:<55} {g['value']:.3f} {g['op']} {g['threshold']} {'PASS' if g['passed'] else 'FAIL'}")


def markdown_table(result: dict) -> str:
    rows = ["| gate | value | threshold | n | |", "|---|---|---|---|---|"]
    for g in result["gates"]:
        rows.append(f"| {g['gate']} | {g['value']:.3f} | {g['op']} {g['threshold']} | {g['n']} | "
                    f"{'PASS' if g['passed'] else 'FAIL'} |")
    return "\n".join(rows)
