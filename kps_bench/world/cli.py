"""``kps-bench world ...`` commands (registered by the main CLI)."""

from __future__ import annotations

import click


@click.group("world")
def world() -> None:
    """The built-in shapes world: build it, check its quality gates, read ground truth of a run."""


@world.command("build")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Folder to write the world to.")
@click.option("--scale", default=1.0, show_default=True, type=float,
              help="Fraction of the training budget (1.0 = the shipped world; smaller for smoke tests).")
@click.option("--no-check", is_flag=True, help="Skip the quality-gate check at the end.")
@click.option("--resume", is_flag=True, help="Continue an interrupted build in --out from its finished stages.")
@click.option("--reuse", multiple=True, type=click.Choice(["vae", "t2i", "probe", "clip", "dino"]),
              help="Copy this stage from --reuse-from instead of training it (repeatable).")
@click.option("--reuse-from", default=None, type=click.Path(exists=True, file_okay=False),
              help="World folder the --reuse stages come from (default: the shipped shapes world).")
def build_cmd(out: str, scale: float, no_check: bool, resume: bool, reuse: tuple[str, ...],
              reuse_from: str | None) -> None:
    """Render the data and train every model of the shapes world from scratch (about 65 min on 2 cores)."""
    from .build import build

    build(out, scale=scale, run_check=not no_check, log=click.echo, resume=resume, reuse=reuse,
          reuse_from=reuse_from)


@world.command("check")
@click.option("--world", "world_dir", default=None, type=click.Path(file_okay=False),
              help="World folder (default: the shipped shapes world).")
@click.option("--n", default=200, show_default=True, type=int, help="Images per gate.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="Write the gates as JSON here (default: <world>/check.json).")
@click.option("--adapters", is_flag=True,
              help="Also the adapter gates: train every method on the evaluation subjects with the shipped recipes "
                   "(about 15 min on 2 cores).")
@click.option("--out", "adapters_out", default="kps-bench-world-check", show_default=True,
              type=click.Path(file_okay=False),
              help="With --adapters: folder for the adapters and runs (a second check reuses them).")
def check_cmd(world_dir: str | None, n: int, json_path: str | None, adapters: bool, adapters_out: str) -> None:
    """Measure and print the quality gates of the shapes world (and write them as JSON)."""
    import os
    from pathlib import Path

    from kps_bench.errors import UserError

    from . import WORLD_DIR
    from .check import check

    w = Path(world_dir) if world_dir else WORLD_DIR
    for sub in ["pipeline/model_index.json", "probe/config.json", "clip/open_clip_config.json", "dino/config.json"]:
        if not (w / sub).exists():
            raise UserError(f"{w / sub} is missing: --world must be a folder written by 'kps-bench world build --out DIR'")
    if json_path is None:
        json_path = str(w / "check.json")
        if not os.access(w, os.W_OK):
            click.echo(f"{w} is not writable; not writing check.json (use --json FILE)")
            json_path = None
    res = check(w, n=n, json_path=json_path, log=click.echo, adapters_out=adapters_out if adapters else None)
    if json_path:
        click.echo(f"wrote {json_path}")
        if Path(json_path).resolve() == (w / "check.json").resolve():
            from .card import write_model_card

            click.echo(f"wrote {write_model_card(w)}")
    if not res["all_passed"]:
        raise SystemExit(1)


@world.command("truth")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--world", "world_dir", default=None, type=click.Path(file_okay=False), help="World folder (probe).")
def truth_cmd(run_dir: str, world_dir: str | None) -> None:
    """Ground truth of a run on the shapes world: true identity, leakage and knowledge shift per subject."""
    from .truth import print_truth, truth

    gt = truth(run_dir, world_dir=world_dir, write=True)
    print_truth(gt, click.echo)


def main() -> None:  # pragma: no cover - for `python -m kps_bench.world.cli`
    world()


if __name__ == "__main__":  # pragma: no cover
    main()
