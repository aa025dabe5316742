"""``kps-bench world check``: measure the quality gates of a shapes world.

Every image of the base model is made through the product's own loader and sampler
(``kps_bench.models.load_pipeline``, ``kps_bench.generate.sample``: one CPU generator per image), so
the images do not depend on the batch size. ``--adapters`` adds the gates that need trained adapters
(``check_adapters``): it trains every method on the evaluation subjects with the shipped recipes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from .render import (BACKGROUNDS, BASE_COLOURS, COLOURS, SHAPES, labels_of, render_many, sample_dataset,
                     sample_factors, wide_dataset)

HELDOUT_SEED = 3
BANK_SEED = 4
GEN_SEED = 5
CEILING_SEED = 6
LEAK_SEED = 7
STEPS, GUIDANCE, BATCH = 25, 7.5, 32
DINO_SLOT_GATES = {"colour": 0.90, "pattern": 0.85, "background": 0.90, "size": 0.70}  # shape: reported only
CEILING_SIGNATURE, CEILING_IDENTITY_GAP = 0.95, 0.12
COLOUR_SHIFT = 0.15  # fraction of the way to another colour, for the probe's shifted-colour gate
ADAPTER_SIGNATURE, ADAPTER_SHAPE = 0.80, 0.80
# Training seeds over which the DreamBooth and LoRA signature gates average: one recipe's single-seed rate on
# one subject ranged 0.64-0.98 over seeds 0-2 (DreamBooth, purple-circle), so one seed measures luck.
SIGNATURE_SEEDS = (0, 1, 2)
LEAK_STEPS_FACTOR, LEAK_IMAGES, LEAK_MIN_DIFFERENCE = 3, 64, 0.10


def load_pipeline(world: Path, dtype: str = "float32"):
    """The world's pipeline through the product's loader (DDIM, as the shapes-world protocol samples)."""
    from kps_bench.models import load_pipeline as load

    return load(str(world / "pipeline"), str(world / "pipeline"), "cpu", dtype, "ddim").pipe


def load_clip(world: Path):
    """The world's open_clip model (its registered config + checkpoint), in eval mode."""
    import open_clip

    from . import train as T

    name = T.register_clip_config(json.loads((world / "clip" / "open_clip_config.json").read_text()))
    return open_clip.create_model(name, pretrained=str(world / "clip" / "open_clip_model.safetensors")).eval()


def load_dino_slot(world: Path):
    from transformers import ViTModel

    return ViTModel.from_pretrained(str(world / "dino")).eval()


def generate(pipe, prompts: list[str], seed: int, batch: int = BATCH, steps: int = STEPS,
             guidance: float = GUIDANCE) -> tuple[np.ndarray, float]:
    """uint8 images ``[n, 32, 32, 3]`` (image i from seed ``seed * 100003 + i``, whatever the batch) and the
    seconds spent per image in the batches after the first."""
    from kps_bench.generate import sample
    from kps_bench.protocol import Generation

    gen = Generation(scheduler="ddim", steps=steps, guidance_scale=guidance, resolution=32)
    out, times = [], []
    t = time.perf_counter()
    for _, images in sample(pipe, prompts, [seed * 100003 + i for i in range(len(prompts))], gen, batch):
        times.append((time.perf_counter() - t, len(images)))
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
        t = time.perf_counter()
    rest = times[1:] or times
    return np.concatenate(out), sum(t for t, _ in rest) / sum(n for _, n in rest)


class Gates:
    """The gate table: ``add`` one measured value against its threshold."""

    def __init__(self, n: int):
        self.n, self.rows = n, []

    def add(self, name: str, value: float, thr: float, op: str = ">=", n_img: int | None = None) -> None:
        ok = {">=": value >= thr, "<=": value <= thr, ">": value > thr}[op]
        self.rows.append({"gate": name, "value": round(float(value), 4), "threshold": thr, "op": op,
                          "passed": bool(ok), "n": self.n if n_img is None else n_img})


def check(world: str | os.PathLike | None = None, n: int = 200, json_path=None, log=print,
          threads: int | None = 2, adapters_out: str | os.PathLike | None = None) -> dict:
    """Measure every gate of ``world`` (default: the shipped one) with ``n`` images each; with ``adapters_out``,
    also the adapter gates (training into that folder). Returns the result written to ``json_path``."""
    import torch

    from . import WORLD_DIR
    from . import train as T
    from .probe import predict
    from .subjects import SUBJECTS, shows
    from .truth import normalised_entropy

    if threads:
        torch.set_num_threads(threads)
    world = Path(world) if world else WORLD_DIR
    t0 = time.time()
    gates = Gates(n)

    # probe on held-out renders of the wide distribution
    imgs, fs = wide_dataset(n, HELDOUT_SEED + 100)
    pr = predict(imgs, world / "probe")
    truth_labels = labels_of(fs)
    from .probe import HEADS

    for k, thr in [("shape", 0.98), ("colour", 0.95), ("pattern", 0.95), ("pattern_colour", 0.95),
                   ("background", 0.98)]:
        acc = np.mean([HEADS[k].index(p[k]) == y for p, y in zip(pr, truth_labels[k])])
        gates.add(f"probe {k.replace('_', ' ')} accuracy (held-out renders)", acc, thr)
    gates.add(f"probe colour accuracy, fill moved {COLOUR_SHIFT:.0%} towards another colour (held-out renders)",
              shifted_colour_accuracy(world, n), 0.95)

    # CLIP zero-shot on held-out renders of the base distribution
    himgs, hfs, _ = sample_dataset(n, HELDOUT_SEED, with_captions=False)
    clip = load_clip(world)
    zs = T.clip_zero_shot(clip, himgs, hfs)
    gates.add("CLIP zero-shot shape", zs["shape"], 0.95)
    gates.add("CLIP zero-shot colour", zs["colour"], 0.90)

    # DINO-slot encoder: k-NN (k=20) of each factor, bank of 2000 renders
    vit = load_dino_slot(world)
    bimgs, bfs, _ = sample_dataset(2000, BANK_SEED, with_captions=False)
    bank, held = T.dino_embed_images(vit, bimgs), T.dino_embed_images(vit, himgs)
    blab, hlab = labels_of(bfs), labels_of(hfs)
    knn = {k: T.knn_accuracy(bank, torch.from_numpy(blab[k]), held, torch.from_numpy(hlab[k]), k=20)
           for k in ("colour", "pattern", "background", "size", "shape")}
    for k, thr in DINO_SLOT_GATES.items():
        gates.add(f"DINO-slot k-NN (k=20) {k} (held-out renders)", knn[k], thr)

    # generations of the base model
    pipe = load_pipeline(world)
    g = np.random.default_rng(GEN_SEED)
    full = [(BASE_COLOURS[g.integers(8)], SHAPES[g.integers(6)], BACKGROUNDS[g.integers(5)]) for _ in range(n)]
    prompts = [f"a {c} {s} on a {b} background" for c, s, b in full]
    gimgs, sec = generate(pipe, prompts, GEN_SEED)
    gp = predict(gimgs, world / "probe")
    gates.add("base full prompts: shape", np.mean([p["shape"] == s for p, (c, s, b) in zip(gp, full)]), 0.90)
    gates.add("base full prompts: colour", np.mean([p["colour"] == c for p, (c, s, b) in zip(gp, full)]), 0.80)
    gates.add("base full prompts: background", np.mean([p["background"] == b for p, (c, s, b) in zip(gp, full)]), 0.80)
    gen_colour = torch.tensor([COLOURS.index(c) for c, _, _ in full])
    knn["colour_generated"] = T.knn_accuracy(bank, torch.from_numpy(blab["colour"]), T.dino_embed_images(vit, gimgs),
                                             gen_colour, k=20)
    gates.add("DINO-slot k-NN (k=20) colour (base images, full prompts)", knn["colour_generated"], 0.80)
    del vit

    n_cls = max(n, 6 * math.ceil(n / 6))
    cls = [SHAPES[i % 6] for i in range(n_cls)]
    cimgs, sec2 = generate(pipe, [f"a {s}" for s in cls], GEN_SEED + 7919)
    cp = predict(cimgs, world / "probe")
    gates.add("base class prompts: shape", np.mean([p["shape"] == s for p, s in zip(cp, cls)]), 0.90, n_img=n_cls)
    # normalised by the log of the number of colour labels the probe can give (11), so it lies in [0, 1]
    ent = normalised_entropy([p["colour"] for p in cp], len(COLOURS))
    per_shape = [normalised_entropy([p["colour"] for p, s in zip(cp, cls) if s == sh], len(COLOURS)) for sh in SHAPES]
    gates.add("base class prompts: colour entropy (normalised)", ent, 0.70, n_img=n_cls)
    leak_rates = {s.name: float(np.mean([shows(p, s.signature()) for p, c in zip(cp, cls) if c == s.class_noun]))
                  for s in SUBJECTS}
    # an image of class c shows "a subject's look" when it shows the signature of a subject of class c
    any_sig = np.mean([any(shows(p, s.signature()) for s in SUBJECTS if s.class_noun == c) for p, c in zip(cp, cls)])
    gates.add("base class prompts: subject signature look", any_sig, 0.05, op="<=", n_img=n_cls)

    ceilings = identity_ceilings(clip, pipe.vae, world, n)
    for name, c in ceilings.items():
        gates.add(f"subject ceiling {name}: signature in VAE reconstructions", c["signature_vae_reconstructions"],
                  CEILING_SIGNATURE)
        gates.add(f"subject ceiling {name}: identity headroom (reconstructions - class members)",
                  c["identity_vae_reconstructions"] - c["identity_class_members"], CEILING_IDENTITY_GAP)
    del clip

    # speed: batch 32, 25 steps, guidance 7.5
    per = (sec + sec2) / 2
    gates.add("generation speed (images/s, batch 32, 25 steps, CFG)", 1.0 / per, 10.0, n_img=n + n_cls)

    details = {
        "clip_zero_shot": zs,
        "dino_slot_knn": {k: round(v, 4) for k, v in knn.items()},
        "class_prompt_colour_entropy_per_shape": dict(zip(SHAPES, [round(e, 4) for e in per_shape])),
        "class_prompt_colour_counts": dict(Counter(p["colour"] for p in cp)),
        "signature_rate_per_subject_on_its_class": leak_rates,
        "identity_ceilings": ceilings,
        "images_per_second": round(1.0 / per, 2),
        "threads": torch.get_num_threads(),
    }
    if adapters_out is not None:
        details["adapters"] = check_adapters(world, Path(adapters_out), gates)
    result = {
        "world": str(world),
        "n": n,
        "gates": gates.rows,
        "all_passed": all(x["passed"] for x in gates.rows),
        "details": details,
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
    from .subjects import SUBJECTS, shows, subject_factors

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
            return round(float(np.mean([shows(p, s.signature()) for p in predict(images, world / "probe")])), 4)

        out[s.name] = {"split": s.split, "identity_renders": identity(renders),
                       "identity_vae_reconstructions": identity(recon), "identity_class_members": identity(members),
                       "signature_renders": signature(renders), "signature_vae_reconstructions": signature(recon),
                       "n": n}
    return out


def shifted_colour_accuracy(world: Path, n: int) -> float:
    """Probe colour accuracy on held-out renders of the base palette whose fill RGB is moved ``COLOUR_SHIFT``
    of the way towards another colour the probe knows (random per image, among those for which the moved
    colour is still nearest to its own): generated colours drift, and the probe must read the nearest one."""
    from .probe import predict
    from .render import RGB, render, sample_factors

    rgb = {c: np.array(RGB[c], float) for c in COLOURS}

    def moved(c: str, o: str) -> np.ndarray:
        return rgb[c] * (1 - COLOUR_SHIFT) + rgb[o] * COLOUR_SHIFT

    def nearest(x: np.ndarray) -> str:
        return min(COLOURS, key=lambda k: np.linalg.norm(rgb[k] - x))

    g = np.random.default_rng(HELDOUT_SEED + 200)
    fs, imgs = [sample_factors(g) for _ in range(n)], []
    for f in fs:
        towards = [o for o in COLOURS if o != f.colour and nearest(moved(f.colour, o)) == f.colour]
        imgs.append(render(f, tuple(moved(f.colour, towards[g.integers(len(towards))]))))
    pred = predict(np.stack(imgs), world / "probe")
    return float(np.mean([p["colour"] == f.colour for p, f in zip(pred, fs)]))


def world_protocol(world: Path, protocol: str = "shapes-world"):
    """The shapes-world protocol pointed at ``world`` (its pipeline, encoders and subject references)."""
    from kps_bench.protocol import load_protocol

    from . import WORLD_DIR

    p = load_protocol(protocol)
    if world.resolve() == WORLD_DIR:
        return p, ()
    sets = (f"base_model={world / 'pipeline'}", f"encoders.clip.arch={world / 'clip' / 'open_clip_config.json'}",
            f"encoders.clip.weights={world / 'clip' / 'open_clip_model.safetensors'}",
            f"encoders.dino.model={world / 'dino'}",
            *(f"subjects.{i}.references={world / 'subjects' / s.name}" for i, s in enumerate(p.subjects)))
    return load_protocol(protocol, sets), sets


def check_adapters(world: Path, out: Path, gates: Gates) -> dict:
    """The adapter gates: every method trained with the shipped recipes on every evaluation subject and run
    through the protocol (``kps-bench demo`` into ``out``; DreamBooth and LoRA also with the other
    ``SIGNATURE_SEEDS``, into ``out/seed-N``), and a LoRA trained for 3x the steps for leakage."""
    from kps_bench.demo import DemoOptions, run_demo
    from kps_bench.leaderboard import load_run

    protocol, sets = world_protocol(world)
    subjects = tuple(s.name for s in protocol.subjects if s.split == "evaluation")
    t0 = time.time()
    res = run_demo(DemoOptions(out=out, subjects=subjects, protocol_overrides=sets, device="cpu"))
    runs = [load_run(d) for d in res.runs]
    base = next(r for r in runs if r.method == "base")
    per: dict = {}
    for run in runs:
        if run.method == "base":
            continue
        for name in run.results["metrics"]:
            gt = run.results["ground_truth"]["subjects"][name]
            ident, bident = run.results["metrics"][name]["identity"], base.results["metrics"][name]["identity"]
            per.setdefault(run.method, {})[name] = {
                "signature": gt["true_identity"], "shape": gt["trigger_shape_rate"], "identity": ident["value"],
                "identity_ci": [ident["ci_low"], ident["ci_high"]], "base_identity": bident["value"],
                "base_identity_ci": [bident["ci_low"], bident["ci_high"]],
                "identity_margin": ident["ci_low"] - bident["ci_high"]}
    signature_methods = ("dreambooth", "lora")
    for seed in SIGNATURE_SEEDS[1:]:
        extra = run_demo(DemoOptions(out=out / f"seed-{seed}", methods=signature_methods, subjects=subjects,
                                     protocol_overrides=sets, train_overrides=(f"seed={seed}",), device="cpu"))
        for run in map(load_run, extra.runs):
            for name, gt in run.results["ground_truth"]["subjects"].items():
                if run.method != "base":
                    per[run.method][name].setdefault("signature_per_seed", {})[seed] = gt["true_identity"]
    for method in signature_methods:
        for v in per[method].values():
            v["signature_per_seed"] = {SIGNATURE_SEEDS[0]: v["signature"], **v.get("signature_per_seed", {})}
            v["signature_seed_mean"] = float(np.mean(list(v["signature_per_seed"].values())))
        gates.add(f"adapters: {method} trigger images show the signature (mean over training seeds "
                  f"{', '.join(map(str, SIGNATURE_SEEDS))}; min over evaluation subjects)",
                  min(v["signature_seed_mean"] for v in per[method].values()), ADAPTER_SIGNATURE,
                  n_img=len(subjects))
        gates.add(f"adapters: {method} identity CI above the base's (min of CI low - base CI high)",
                  min(v["identity_margin"] for v in per[method].values()), 0.0, op=">", n_img=len(subjects))
    for method in sorted(per):
        gates.add(f"adapters: {method} trigger images show the requested shape (min over evaluation subjects)",
                  min(v["shape"] for v in per[method].values()), ADAPTER_SHAPE, n_img=len(subjects))
    leak = leakage(world, protocol, out, subjects)
    gates.add(f"adapters: signature in class-prompt images, LoRA x{LEAK_STEPS_FACTOR} steps minus base",
              leak["lora_rate"] - leak["base_rate"], LEAK_MIN_DIFFERENCE, n_img=leak["n"])
    return {"per_method": per, "leakage": leak, "duration_s": round(time.time() - t0, 1), "demo_out": str(out),
            "leaderboard": res.markdown}


def leakage(world: Path, protocol, out: Path, subjects: tuple[str, ...]) -> dict:
    """Signature rate of the subject in ``LEAK_IMAGES`` class-prompt images ("a circle") per evaluation subject,
    for the base and for a LoRA trained ``LEAK_STEPS_FACTOR`` times the shipped steps (same seeds)."""
    from scipy.stats import fisher_exact

    from kps_bench.models import apply_adapter, load_pipeline as load, resolve_adapter
    from kps_bench.train import train
    from kps_bench.train.output import partial_dir
    from kps_bench.train.recipe import load_recipe

    from .probe import predict
    from .subjects import shows, subject_by_name

    steps = load_recipe("lora", protocol)[0].steps * LEAK_STEPS_FACTOR
    rates = {}
    base_hits = lora_hits = 0
    for name in subjects:
        s = subject_by_name(name)
        adapter_dir = out / "adapters" / f"lora-x{LEAK_STEPS_FACTOR}" / name
        if not (adapter_dir / "training.json").is_file():
            train("lora", protocol, name, adapter_dir, device="cpu", overrides=(f"steps={steps}",),
                  resume=partial_dir(adapter_dir).exists())
        prompts = [f"a {s.class_noun}"] * LEAK_IMAGES
        loaded = load(protocol.base_model, protocol.resolve(protocol.base_model, "pipeline"), "cpu", "float32", "ddim")
        base_imgs, _ = generate(loaded.pipe, prompts, LEAK_SEED)
        pipe = apply_adapter(loaded, resolve_adapter(str(adapter_dir), "auto", False), [s.trigger], "cpu", "float32",
                             "ddim")
        lora_imgs, _ = generate(pipe, prompts, LEAK_SEED)
        b = sum(shows(p, s.signature()) for p in predict(base_imgs, world / "probe"))
        lo = sum(shows(p, s.signature()) for p in predict(lora_imgs, world / "probe"))
        rates[name] = {"base": b / LEAK_IMAGES, "lora": lo / LEAK_IMAGES}
        base_hits, lora_hits = base_hits + b, lora_hits + lo
    n = LEAK_IMAGES * len(subjects)
    p = fisher_exact([[lora_hits, n - lora_hits], [base_hits, n - base_hits]], alternative="greater").pvalue
    return {"steps": steps, "n": n, "base_rate": base_hits / n, "lora_rate": lora_hits / n, "p_value": float(p),
            "per_subject": rates}


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
