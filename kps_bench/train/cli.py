"""``kps-bench train-baseline``: train one baseline adapter for one subject of a protocol."""

from __future__ import annotations

from pathlib import Path

import click

from .recipe import METHODS


@click.command("train-baseline")
@click.argument("method", type=click.Choice(METHODS))
@click.option("--protocol", "protocol_name", default="shapes-world", show_default=True,
              help="Protocol name or path; its subject, prompts, base model and `training:` recipe overrides are used.")
@click.option("--subject", required=True, help="The protocol subject to train (see `kps-bench protocols show`).")
@click.option("--out", type=click.Path(file_okay=False),
              help="Adapter folder to write (must not exist). Training writes OUT.partial and renames it when done. "
                   "Default: adapters/PROTOCOL/METHOD/SUBJECT, with -seedN appended when --seed is given.")
@click.option("--seed", type=click.IntRange(min=0), help="Training seed, overriding the recipe's `seed` (after --set); "
              "recorded in training.json. Replicates with different seeds go to different default --out folders.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from the last checkpoint in OUT.partial.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N (or use `accelerate launch`).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set steps=200 --set cat_weight=0.5 (repeatable).")
def train_baseline(method, protocol_name, subject, out, seed, resume, device, sets):
    """Train a CAT, LoRA, DreamBooth or textual-inversion adapter with its fixed recipe (baselines/METHOD.yaml).

    The effective recipe is baselines/METHOD.yaml after the recipes it inherits (`inherit:`), then the protocol's
    `training.defaults` and `training.METHOD` sections, then --set, then --seed. Evaluate the result with
    `kps-bench run --adapter OUT`.
    """
    from ..distributed import launch_rank
    from ..protocol import load_protocol
    from . import train

    protocol = load_protocol(protocol_name, ())
    suffix = "" if seed is None else f"-seed{seed}"
    out = Path(out) if out else Path("adapters") / protocol.name / method / f"{subject}{suffix}"
    result = train(method, protocol, subject, out, device=device, overrides=tuple(sets), resume=resume, seed=seed)
    if launch_rank():
        return  # under a launcher, rank 0 reports for every rank
    t = result.training
    losses = ", ".join(f"{k} {v:.4f}" for k, v in t["final_loss"].get("mean_last_10pct", {}).items())
    click.echo(f"Trained {method} for '{subject}' in {t['duration_s']:.1f} s ({t['steps']} steps, seed {t['seed']}; "
               f"{losses}). Written to {result.out}. Evaluate it with:\n  kps-bench run --protocol {protocol_name} "
               f"--adapter {result.out} --out runs/{method}-{subject}{suffix}")
