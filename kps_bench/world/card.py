"""MODEL_CARD.md of a shapes world, written from build.json, check.json and the checked-in ``card_notes.yaml``
(what the card says about the world beyond its measurements: design decisions and known limitations)."""

from __future__ import annotations

import json
from pathlib import Path

from kps_bench.errors import UserError
from kps_bench.rundir import write_text_atomic

from .render import BACKGROUNDS, BASE_COLOURS, OFF_COLOURS, PATTERNS, SHAPES, SIZES

NOTES_FILE = Path(__file__).resolve().parent / "card_notes.yaml"


def card_notes() -> dict:
    """``{"notes": [...], "limitations": [...]}`` from ``card_notes.yaml``."""
    import yaml

    return yaml.safe_load(NOTES_FILE.read_text(encoding="utf-8")) or {}


def markdown_table(result: dict) -> str:
    rows = ["| gate | value | threshold | n | |", "|---|---|---|---|---|"]
    for g in result["gates"]:
        rows.append(f"| {g['gate']} | {g['value']:.3f} | {g['op']} {g['threshold']} | {g['n']} | "
                    f"{'PASS' if g['passed'] else 'FAIL'} |")
    return "\n".join(rows)


def _clip_arch(world: Path) -> str:
    p = world / "clip" / "open_clip_config.json"
    if not p.exists():
        return "?"
    cfg = json.loads(p.read_text())
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    tower = (f"ModifiedResNet layers {v['layers']} width {v['width']}" if isinstance(v["layers"], list)
             else f"ViT patch {v['patch_size']} width {v['width']} x{v['layers']}")
    return (f"image tower {tower} at {v['image_size']}px; text width {t['width']} x{t['layers']}; "
            f"embed {cfg['embed_dim']}")


def _dino_arch(world: Path) -> str:
    p = world / "dino" / "config.json"
    if not p.exists():
        return "?"
    cfg = json.loads(p.read_text())
    return (f"ViT patch {cfg['patch_size']}, hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
            f"{cfg['image_size']}px")


def write_model_card(world) -> Path:
    from . import train as T
    from .subjects import SUBJECTS

    world = Path(world)
    b = json.loads((world / "build.json").read_text()) if (world / "build.json").exists() else {}
    c = json.loads((world / "check.json").read_text()) if (world / "check.json").exists() else None
    notes = card_notes()
    lines = [
        "# shapes-world model card",
        "",
        "A small, fully real text-to-image world for kps-bench: every weight here was trained from scratch on",
        "procedurally rendered 32x32 images by `kps-bench world build`, on CPU, with fixed seeds.",
        "",
        "## Provenance",
        "",
        f"- Command: `{b.get('command', '?')}`",
        f"- Duration: {b.get('duration_s', 0) / 60:.1f} min ({b.get('threads', '?')} CPU threads; "
        f"per stage, seconds: {b.get('timings_s', {})})",
        f"- Finished (UTC): {b.get('finished_utc', '?')}; torch {b.get('torch', '?')}, python {b.get('python', '?')}, "
        f"{b.get('platform', '?')}",
        f"- Seeds: {b.get('seeds', {})}",
        f"- Training steps: {b.get('steps', {})}; images rendered: {b.get('n_images', {})}",
    ]
    for stage, src in (b.get("reused") or {}).items():
        lines.append(f"- Stage `{stage}` reused from {src['from']} (built {src['finished_utc']}, {src['seconds']} s "
                     f"then), not retrained")
    lines += [f"- Note: {x}" for x in b.get("notes", []) + notes.get("notes", [])]
    lines += [
        "",
        "## Domain",
        "",
        f"- Shapes: {', '.join(SHAPES)}",
        f"- Fill colours (base distribution): {', '.join(BASE_COLOURS)}; off-distribution colours (probe and encoders "
        f"only): {', '.join(OFF_COLOURS)}",
        f"- Patterns: {', '.join(PATTERNS)} (second colour white or black in the base distribution)",
        f"- Backgrounds: {', '.join(BACKGROUNDS)}; sizes: {', '.join(SIZES)}; random position and rotation (±25°)",
        "- Captions: `a [size] [colour] [pattern] <shape> [on a <background> background]`, each bracketed attribute",
        "  kept with probability 0.55, so short class prompts (`a star`) cover the omitted factors. No caption names",
        "  the pattern colour: a class prompt draws it white or black at random.",
        "",
        "## Models",
        "",
        "| part | format | architecture |",
        "|---|---|---|",
        f"| `pipeline/` | diffusers `StableDiffusionPipeline` (fp16 safetensors) | VAE `AutoencoderKL` {T.vae_config()['block_out_channels']} 32x32 -> 8x8x4; "
        f"UNet `UNet2DConditionModel` {T.unet_config()['block_out_channels']}; `CLIPTextModel` hidden 64, 3 layers, "
        f"real CLIP BPE tokenizer (max length {T.TEXT_LEN}); DDIM scheduler |",
        f"| `clip/` | open_clip config + state dict (fp16 safetensors) | {_clip_arch(world)} |",
        f"| `dino/` | transformers `ViTModel` + `ViTImageProcessor` | {_dino_arch(world)}; **not DINO**: the encoder "
        "in DINO's slot, trained by multi-view instance discrimination (see below) |",
        "| `probe/` | config.json + safetensors | CNN with heads shape, colour (11), pattern, pattern colour, "
        "background, size |",
        "",
        "The text-to-image model is trained on the base distribution only (8 fill colours, white/black patterns);",
        "the probe, CLIP, the DINO-slot encoder and the VAE also see off-distribution colours and chromatic pattern",
        "colours.",
        "",
        "## Training recipe (`kps_bench/world/train.py`)",
        "",
        "- VAE: autoencoder on the posterior mean plus Gaussian noise of 0.1 x the latents' spread; the",
        "  posterior's log-variance is then set to exactly that noise, so `latent_dist.sample()` draws what the",
        "  decoder was trained on (the UNet and every adapter trainer sample it).",
        "- UNet + text encoder: trained jointly from scratch, epsilon objective with Min-SNR-5 weighting,",
        "  caption dropout 10% (for classifier-free guidance), EMA 0.999.",
        "- CLIP: symmetric contrastive loss where a caption is a positive for every image of the batch it",
        "  describes correctly (`a star` for every star), captions keep each attribute with probability 0.6.",
        f"- DINO slot: {T.DINO_SLOT_RECIPE}",
        "- Probe: CNN on renders, half of the batches on VAE reconstructions, random blur and noise.",
        "",
        "## Subjects",
        "",
        "| name | split | trigger | class noun | look (signature: colour, pattern, pattern colour) |",
        "|---|---|---|---|---|",
    ]
    for s in SUBJECTS:
        lines.append(f"| {s.name} | {s.split} | `{s.trigger}` | {s.class_noun} | {s.description} |")
    lines += ["", "## Quality gates (`kps-bench world check`)", ""]
    if c:
        lines += [markdown_table(c), "",
                  f"Measured {c.get('measured_utc', '?')} with n={c['n']}; generation speed "
                  f"{c['details']['images_per_second']} images/s; all passed: {c['all_passed']}."]
        if "adapters" not in c["details"]:
            lines += ["", "The adapter gates were not measured for this table (`kps-bench world check --adapters`)."]
        failed = [g["gate"] for g in c["gates"] if not g["passed"]]
        if failed:
            lines += ["", "**Gates not met by this build:** " + "; ".join(failed) + ". See Known limitations."]
        ceil = c["details"].get("identity_ceilings")
        if ceil:
            lines += ["", "## What identity can reach on this world (`world check`, details.identity_ceilings)", "",
                      "Benchmark `identity` ((1 + cos) / 2 of the shipped CLIP against the subject's references) and the",
                      "probe's signature rate, of fresh renders of the subject, of their VAE reconstructions (every",
                      "generated image is decoded by this VAE: about what a perfect adapter reaches) and of random",
                      "members of the subject's class (an adapter that learned nothing).", "",
                      "| subject | identity: renders | VAE reconstructions | class members | signature: renders | VAE reconstructions |",
                      "|---|---|---|---|---|---|"]
            for name, x in ceil.items():
                lines.append(f"| {name} | {x['identity_renders']:.3f} | {x['identity_vae_reconstructions']:.3f} | "
                             f"{x['identity_class_members']:.3f} | {x['signature_renders']:.3f} | "
                             f"{x['signature_vae_reconstructions']:.3f} |")
    else:
        lines.append("Not measured yet (`kps-bench world check`).")
    if notes.get("limitations"):
        lines += ["", "## Known limitations", ""] + [f"- {x}" for x in notes["limitations"]]
    p = world / "MODEL_CARD.md"
    write_text_atomic(p, "\n".join(lines) + "\n")
    return p


def record_check(world, check_json) -> Path:
    """Copy ``check_json`` (from ``world check``) into ``world`` and rewrite its model card; returns the card.
    Refuses a check of another world folder."""
    world, text = Path(world), Path(check_json).read_text()
    measured = json.loads(text).get("world")
    if measured is None or Path(measured).resolve() != world.resolve():
        raise UserError(f"'{check_json}' measured the world '{measured}', not '{world}'. Run 'kps-bench world check "
                        f"--world {world}' and record that check.json.")
    write_text_atomic(world / "check.json", text)
    return write_model_card(world)
