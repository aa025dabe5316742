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
@click.option("--out", "out", default="kps-bench-world-check", show_default=True, type=click.Path(file_okay=False),
              help="Folder for check.json and, with --adapters, the adapters and runs (a second check reuses them). "
                   "The world folder itself is never written.")
@click.option("--adapters", is_flag=True,
              help="Also the adapter gates: train every method on the evaluation subjects with the shipped recipes "
                   "(about 15 min on 2 cores).")
def check_cmd(world_dir: str | None, n: int, out: str, adapters: bool) -> None:
    """Measure and print the quality gates of the shapes world into OUT/check.json (exit 1 if one fails)."""
    from pathlib import Path

    from kps_bench.rundir import check_writable

    from .check import check

    w = world_folder(world_dir)
    out_dir = Path(out)
    check_writable(out_dir)
    res = check(w, n=n, json_path=out_dir / "check.json", log=click.echo,
                adapters_out=out_dir if adapters else None)
    click.echo(f"wrote {out_dir / 'check.json'}")
    if not res["all_passed"]:
        raise SystemExit(1)


@world.command("card")
@click.option("--world", "world_dir", required=True, type=click.Path(file_okay=False),
              help="World folder to write check.json and MODEL_CARD.md into (a build output, or the repository's "
                   "kps_bench/world/shapes-world when shipping new measurements).")
@click.option("--check", "check_json", required=True, type=click.Path(exists=True, dir_okay=False),
              help="check.json written by 'kps-bench world check --world <the same folder>'.")
def card_cmd(world_dir: str, check_json: str) -> None:
    """Record a check's measurements in a world folder: copy check.json and rewrite its MODEL_CARD.md."""
    from .card import record_check

    click.echo(f"wrote {record_check(world_folder(world_dir), check_json)}")


def world_folder(world_dir: str | None):
    """``world_dir`` (default: the shipped world), checked to be a folder written by ``world build``."""
    from pathlib import Path

    from kps_bench.errors import UserError

    from . import WORLD_DIR

    w = Path(world_dir) if world_dir else WORLD_DIR
    for sub in ["pipeline/model_index.json", "probe/config.json", "clip/open_clip_config.json", "dino/config.json"]:
        if not (w / sub).exists():
            raise UserError(f"{w / sub} is missing: --world must be a folder written by 'kps-bench world build --out DIR'")
    return w


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
