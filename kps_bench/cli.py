"""The ``kps-bench`` command line: parses options and calls library functions.

Exit codes: 0 success, 2 user error (bad flag, bad protocol, missing file), 1 internal error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import UserError, as_user_error

DEFAULT_PROTOCOL = "shapes-world"


class KpsGroup(click.Group):
    """The error boundary of every command: UserError and the known exception types of
    :func:`~kps_bench.errors.as_user_error` become a one-paragraph message and exit 2; anything else is a
    bug: "Internal error", exit 1 (traceback with --debug)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - the top-level handler of the CLI
            if ctx.meta.get("kps_verbose"):
                raise
            user = e if isinstance(e, UserError) else as_user_error(e)
            if user is not None:
                click.echo(f"Error: {user}", err=True)
                sys.exit(2)
            click.echo(f"Internal error: {type(e).__name__}: {e}\nRe-run with --debug for the traceback, and "
                       f"report it if it persists.", err=True)
            sys.exit(1)


@click.group(cls=KpsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", "--verbose", "verbose", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="kps-bench")
@click.pass_context
def main(ctx, verbose):
    """kps-bench: did your adapter learn the concept without wrecking the base model?

    Generates images from a base text-to-image model with and without an adapter and scores
    them: KPS, identity, preservation, CLIP-I, CLIP-T, DINO and intra-class diversity.
    """
    ctx.meta["kps_verbose"] = verbose
    _quiet_libraries(verbose)


def _quiet_libraries(verbose: bool) -> None:
    """Hide the libraries' own loading bars and info logs; kps-bench shows its own progress."""
    import os

    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _protocol(name, sets):
    from .protocol import load_protocol

    return load_protocol(name, tuple(sets))


SET_HELP = "Override a protocol field, e.g. --set generation.steps=25 or --set subjects.0.trigger=zwx (repeatable)."
PARTIAL_HELP = "List methods run on fewer subjects than the others, marked '(partial)', instead of refusing."
CACHE_HELP = ("Image cache shared by runs, so base images are made once for every method (default: $KPS_BENCH_CACHE, "
              "else ~/.cache/kps-bench). Run folders get hard links (or copies) of its images.")


@main.command()
@click.option("--protocol", "protocol_name", default=DEFAULT_PROTOCOL, show_default=True,
              help="Protocol name (see `kps-bench protocols list`) or path to a protocol YAML file.")
@click.option("--base", help="Base model to use instead of the protocol's base_model (hub id or diffusers folder).")
@click.option("--adapter", type=click.Path(), help="Adapter: a trainer's output folder, a LoRA or learned-embeds "
              ".safetensors file, or a fine-tuned diffusers pipeline folder.")
@click.option("--adapter-kind", type=click.Choice(["auto", "lora", "textual-inversion", "pipeline", "none"]),
              default="auto", show_default=True, help="How to load --adapter; auto detects it from the files.")
@click.option("--subject", "subjects", multiple=True, help="Evaluate only this subject (repeatable). Defaults to "
              "the adapter's training subject, or every evaluation subject when there is no adapter.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/latest", show_default=True,
              help="Run directory to write (images/, images.jsonl, embeddings.safetensors, results.json). "
                   "Re-running into the same folder reuses the images already made.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N | mps.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Override generation.dtype.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per generation call (overrides "
              "generation.batch_size; lower it on out-of-memory). Images do not depend on it.")
@click.option("--label", help="Method name for leaderboards when the adapter has no training.json.")
@click.option("--allow-unsafe-pickle", is_flag=True, help="Allow loading pickle checkpoints (.bin/.pt/.ckpt). "
              "Only for files you trust: pickle can run code.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--cache-dir", type=click.Path(file_okay=False), help=CACHE_HELP)
@click.option("--dry-run", is_flag=True, help="Print the plan (images to generate and already made, encoder passes, "
              "time estimated from a short calibration on --device) and stop; nothing is written.")
@click.option("--compile", "compile_unet", is_flag=True, help="torch.compile the UNet (worth it for long runs).")
@click.option("--channels-last", is_flag=True, help="UNet and VAE in channels-last memory format.")
@click.option("--tf32", is_flag=True, help="Allow TF32 matmuls and convolutions on NVIDIA GPUs.")
def run(protocol_name, base, adapter, adapter_kind, subjects, out, device, dtype, batch_size, label,
        allow_unsafe_pickle, sets, cache_dir, dry_run, compile_unet, channels_last, tf32):
    """Generate base and adapter images for a protocol and score them.

    The speed flags (--compile, --channels-last, --tf32) are recorded in provenance and in the images' cache keys."""
    from .models import SpeedFlags
    from .run import RunOptions, run_benchmark

    sets = list(sets) + ([f"base_model={base}"] if base else []) + ([f"generation.dtype={dtype}"] if dtype else [])
    protocol = _protocol(protocol_name, sets)
    opts = RunOptions(
        out=Path(out), adapter=adapter, adapter_kind=adapter_kind, subjects=tuple(subjects), device=device,
        batch_size=batch_size, allow_unsafe_pickle=allow_unsafe_pickle, label=label, overrides=tuple(sets),
        cache_dir=Path(cache_dir) if cache_dir else None, speed=SpeedFlags(compile_unet, channels_last, tf32))
    if dry_run:
        from .plan import plan_run

        plan = plan_run(protocol, opts)
        if plan is not None:  # None on the ranks other than 0 under a launcher
            click.echo(plan.text())
        return
    results = run_benchmark(protocol, opts)
    if results is not None:  # None on the ranks other than 0 under a launcher
        _print_summary(results, out)


@main.command()
@click.option("--manifest", required=True, type=click.Path(), help="images.jsonl listing the images to score "
              "(same format as a run directory's; paths relative to the manifest's folder).")
@click.option("--protocol", "protocol_name", default=DEFAULT_PROTOCOL, show_default=True,
              help="Protocol giving the encoders, subjects (and their references) and metrics.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for images.jsonl, "
              "embeddings.safetensors and results.json.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N | mps.")
@click.option("--label", "--method", "label", help="Method name of these images for leaderboards (default: base).")
@click.option("--allow-outside-paths", is_flag=True, help="Read image paths that leave the manifest's folder "
              "(absolute paths, ../). Refused by default, so a scoring service reads only the files it was given.")
@click.option("--allow-unsafe-pickle", is_flag=True, help="Allow loading pickle encoder checkpoints (.bin/.pt). "
              "Only for files you trust: pickle can run code.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def score(manifest, protocol_name, out, device, label, allow_outside_paths, allow_unsafe_pickle, sets):
    """Score images that already exist on disk (made by any tool)."""
    from .run import score_manifest

    protocol = _protocol(protocol_name, sets)
    results = score_manifest(protocol, Path(manifest), Path(out), device, label, allow_unsafe_pickle,
                             allow_outside_paths)
    if results is not None:  # None on the ranks other than 0 under a launcher
        _print_summary(results, out)


def _print_summary(results: dict, out) -> None:
    """Metrics as rows, subjects as columns: value [95% CI]."""
    from rich.console import Console
    from rich.table import Table

    from .registry import COLUMNS

    names = [k for k in COLUMNS if k in results["overall"]]
    columns = list(results["metrics"].items()) + [("overall", results["overall"])]
    table = Table(title=f"kps-bench results (kps_version {results['kps_version']})")
    table.add_column("metric")
    for subject, _ in columns:
        table.add_column(subject, justify="right")
    for n in names:
        table.add_row(n, *[f"{m[n]['value']:.4f} [{m[n]['ci_low']:.3f}, {m[n]['ci_high']:.3f}]" for _, m in columns])
    Console().print(table)
    counts = results["counts"]
    click.echo(f"image files: {counts['reference']} reference, {counts['generated']} generated ({counts['base']} base, "
               f"{counts['adapter']} adapter); {counts['flagged']} flagged (NaN/black). Written to {out}/results.json")


@main.group()
def protocols():
    """List, show and validate protocol files."""


@protocols.command("list")
def protocols_list():
    """Protocols found in $KPS_BENCH_PROTOCOLS, ./protocols and the package's protocols/."""
    from .config import PROTOCOLS, list_files

    for name, path in sorted(list_files(PROTOCOLS).items()):
        click.echo(f"{name}\t{path}")


@protocols.command("show")
@click.argument("name")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def protocols_show(name, sets):
    """Print the effective protocol (after --set) as YAML, with its sha256."""
    import yaml

    p = _protocol(name, sets)
    click.echo(yaml.safe_dump(p.to_dict(), sort_keys=False).rstrip())
    click.echo(f"# sha256: {p.sha256}")


@protocols.command("validate")
@click.argument("path")
def protocols_validate(path):
    """Check a protocol file, every local path it names, that every subject's references folder holds images, and
    every method's effective recipe, whose training captions must not be evaluation prompts (unless the protocol
    says allow_prompt_overlap: true)."""
    from .protocol import check_local_paths
    from .run import check_reference_folders, reference_images
    from .train.recipe import METHODS, load_recipe

    p = _protocol(path, ())
    check_local_paths(p)
    for method in METHODS:
        load_recipe(method, p)
    check_reference_folders(p, p.subjects)
    for s in p.subjects:
        reference_images(p, s)
    n_prompts = "/".join(str(n) for n in sorted({len(p.prompts_for(s)) for s in p.subjects}))
    overlap = "; training captions may equal evaluation prompts (allow_prompt_overlap)" if p.allow_prompt_overlap else ""
    click.echo(f"OK: {path} (protocol {p.name} v{p.version}, {len(p.subjects)} subjects, {n_prompts} prompts per "
               f"subject, recipes of {', '.join(METHODS)}, sha256 {p.sha256[:16]}{overlap})")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--group-by", type=click.Choice(["method", "subject"]), default="method", show_default=True,
              help="One row per method (mean over its subjects and training seeds), or a subject x method table of "
                   "kps.")
@click.option("--reference", help="Method to compare every other method with on kps and preservation: median paired "
              "difference over (subject, prompt) pairs with its CI, and Wilcoxon signed-rank p-values, Holm-corrected.")
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "tex", "json"]), default="md", show_default=True,
              help="Markdown, CSV, LaTeX (booktabs table with caption and label), or JSON (one row per method and "
                   "metric, or per subject and method).")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the table here instead of printing it.")
@click.option("--allow-mixed", is_flag=True, help="Put runs of different protocols in separate tables instead of refusing.")
@click.option("--allow-partial", is_flag=True, help=PARTIAL_HELP)
@click.option("--resamples", type=click.IntRange(min=10), default=1000, show_default=True, help="Bootstrap resamples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
def leaderboard(run_dirs, group_by, reference, fmt, out, allow_mixed, allow_partial, resamples, seed):
    """Turn run directories into a leaderboard with 95% CIs, training-seed spread, ranks and significance.

    Runs of one method and subject are training-seed replicates; their seeds (from the adapters' training.json)
    must differ."""
    from .leaderboard import build_tables, load_run, render
    from .rundir import check_writable, write_text_atomic

    if out:
        check_writable(out, is_file=True)
    tables = build_tables([load_run(d) for d in run_dirs], group_by, reference, allow_mixed, resamples, seed,
                          allow_partial=allow_partial)
    text = render(tables, fmt)
    if out:
        write_text_atomic(out, text)
        click.echo(f"Wrote {out}")
    else:
        click.echo(text, nl=False)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--method", required=True, help="The method to compare (e.g. cat).")
@click.option("--reference", required=True, help="The method it is compared with (e.g. lora).")
@click.option("--metric", "metrics", multiple=True, help="Metric or ground truth to compare (repeatable; default: "
              "kps, kps_gain, identity, preservation, diversity_ratio, vendi_ratio and the ground truth of identity, "
              "knowledge shift and diversity, where the runs have them).")
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "json"]), default="md", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Write the table here instead of printing it.")
@click.option("--resamples", type=click.IntRange(min=10), default=1000, show_default=True, help="Bootstrap resamples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
def compare(run_dirs, method, reference, metrics, fmt, out, resamples, seed):
    """One method against another, paired over (subject, training seed): means, mean difference with its bootstrap
    CI, and Wilcoxon signed-rank p-values, Holm-corrected over the metrics."""
    from .compare import compare as run_compare, render
    from .leaderboard import load_run
    from .rundir import check_writable, write_text_atomic

    if out:
        check_writable(out, is_file=True)
    runs = [load_run(d, with_stats=False) for d in run_dirs]  # per-subject values only
    text = render(run_compare(runs, method, reference, tuple(metrics) or None, resamples, seed), fmt)
    if out:
        write_text_atomic(out, text)
        click.echo(f"Wrote {out}")
    else:
        click.echo(text, nl=False)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--prompts", type=click.IntRange(min=1), default=3, show_default=True, help="Prompts shown per subject.")
@click.option("--seeds", type=click.IntRange(min=1), default=2, show_default=True, help="Seeds shown per prompt.")
def grid(run_dirs, out, prompts, seeds):
    """Contact sheet per subject: references, then base and each method, seed-paired, trigger-free and trigger."""
    from .figures import grid as make_grid
    from .leaderboard import load_run

    click.echo(f"Wrote {make_grid([load_run(d) for d in run_dirs], out, prompts, seeds)}")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Image to write (.png, .pdf or .svg).")
@click.option("--allow-mixed", is_flag=True, help="Plot only the first protocol's table when runs mix protocols.")
@click.option("--allow-partial", is_flag=True, help=PARTIAL_HELP)
def plot(run_dirs, out, allow_mixed, allow_partial):
    """Identity against preservation, one point per method with CI bars, and iso-KPS curves."""
    from .figures import plot as make_plot
    from .leaderboard import build_tables, load_run

    tables = build_tables([load_run(d) for d in run_dirs], allow_mixed=allow_mixed, allow_partial=allow_partial)
    click.echo(f"Wrote {make_plot(tables[0], out)}")


@main.command("tiny-models")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the tiny models to.")
@click.option("--force", is_flag=True, help="Write into --out even if it already holds files (they may be overwritten).")
@click.option("--sdxl", is_flag=True, help="Also write a tiny SDXL pipeline (sdxl/pipeline), a LoRA for it (sdxl/lora), "
              "a two-encoder textual-inversion embedding (sdxl/textual-inversion) and their protocol tiny-sdxl.yaml.")
def tiny_models(out, force, sdxl):
    """Write tiny random models and a protocol that uses them (for trying the plumbing; numbers are noise)."""
    from .tiny import build_all

    paths = build_all(out, force, sdxl)
    click.echo(f"Wrote tiny models and protocol(s) {', '.join(map(str, paths))}. Try:\n  kps-bench run --protocol "
               f"{paths[0]} --adapter {Path(out) / 'lora'} --subject red-block --out {Path(out) / 'run'}")
    if sdxl:
        click.echo(f"  kps-bench run --protocol {paths[1]} --adapter {Path(out) / 'sdxl' / 'lora'} --subject red-block "
                   f"--out {Path(out) / 'run-sdxl'}")


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default="kps-bench-demo", show_default=True,
              help="Folder for adapters/, runs/, leaderboard.md/.csv/.tex, grid.png and plot.png. A second run "
                   "reuses every finished step.")
@click.option("--protocol", "protocol_name", default=DEFAULT_PROTOCOL, show_default=True, help="Protocol to run.")
@click.option("--method", "methods", multiple=True, type=click.Choice(["cat", "lora", "dreambooth", "textual-inversion"]),
              help="Methods to train (repeatable; default all four).")
@click.option("--subject", "subjects", multiple=True, help="Subjects to train (repeatable; default: the evaluation subjects).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--train-set", "train_sets", multiple=True, metavar="KEY=VALUE",
              help="Recipe override applied to every method, e.g. --train-set steps=20 (repeatable).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help=CACHE_HELP)
@click.option("--jobs", type=int, help="Trainings and evaluations at once, each in a process pinned to one GPU "
              "(CUDA_VISIBLE_DEVICES) or on the CPU. Default: one per visible GPU with CUDA, else 1. Their logs go "
              "to OUT/logs/.")
@click.option("--seed", "seeds", multiple=True, type=click.IntRange(min=0), help="Training seed (repeatable): each "
              "method and subject is trained once per seed, into adapters/METHOD/SUBJECT-seedN, and the leaderboard "
              "averages over the seeds (with seed_sd). Default: once, with the recipe's seed, into SUBJECT.")
def demo(out, protocol_name, methods, subjects, sets, train_sets, device, cache_dir, jobs, seeds):
    """Train CAT, LoRA, DreamBooth and textual inversion on the shapes world, evaluate, and write the leaderboard."""
    from .demo import DemoOptions, run_demo

    opts = DemoOptions(out=Path(out), protocol=protocol_name, subjects=tuple(subjects), protocol_overrides=tuple(sets),
                       train_overrides=tuple(train_sets), device=device,
                       cache_dir=Path(cache_dir) if cache_dir else None, jobs=jobs,
                       seeds=tuple(dict.fromkeys(seeds)))
    if methods:
        opts.methods = tuple(methods)
    result = run_demo(opts)
    click.echo(result.markdown)
    click.echo(f"Demo finished in {result.seconds:.0f} s. Leaderboard, grid.png and plot.png are in {result.out}/")


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default="kps-bench-validity", show_default=True,
              help="Folder for adapters/, runs/, validity.json, validity.md/.csv, adapters.csv, scatter.png and "
                   "summary.md. A second run reuses every finished adapter and run.")
@click.option("--study", default="shapes-world", show_default=True,
              help="Validity study: a name (looked up in $KPS_BENCH_STUDIES, ./studies and the shipped studies) or "
                   "the path to a study YAML file (protocol, protocol_overrides, variants).")
@click.option("--protocol", "protocol_name", help="Protocol to use instead of the study's.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a protocol field after the study's protocol_overrides (repeatable).")
@click.option("--subject", "subjects", multiple=True, help="Train and evaluate only this subject (repeatable; "
              "default: the protocol's evaluation subjects).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help=CACHE_HELP)
@click.option("--resamples", type=click.IntRange(min=10), default=1000, show_default=True,
              help="Bootstrap resamples of the adapters.")
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
def validate(out, study, protocol_name, sets, subjects, device, cache_dir, resamples, seed):
    """The metric-validity study: train the study's adapter variants on the shapes world, run the protocol on each
    and on the base model, and rank-correlate every metric with the probe's ground truth."""
    from .validity import ValidityOptions, run_validity

    result = run_validity(ValidityOptions(out=Path(out), study=study, protocol=protocol_name,
                                          protocol_overrides=tuple(sets), subjects=tuple(subjects), device=device,
                                          cache_dir=Path(cache_dir) if cache_dir else None, resamples=resamples,
                                          seed=seed))
    click.echo(result.summary)
    click.echo(f"Wrote validity.json, validity.md, validity.csv, adapters.csv, scatter.png and summary.md to "
               f"{result.out}/")


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default="kps-bench-tune", show_default=True,
              help="Folder for adapters/, runs/, tune.json, tune.md and tune.csv. A second run reuses every finished "
                   "adapter and run.")
@click.option("--search", default="shapes-world", show_default=True,
              help="Recipe search: a name (looked up in $KPS_BENCH_SEARCHES, ./searches and the shipped searches) or "
                   "the path to a search YAML file (protocol, protocol_overrides, select, variants).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a protocol field after the search's protocol_overrides (repeatable).")
@click.option("--subject", "subjects", multiple=True, help="Search on this development subject only (repeatable; "
              "default: all of the protocol's development subjects).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help=CACHE_HELP)
def tune(out, search, sets, subjects, device, cache_dir):
    """The equal-budget recipe search: train every configuration of the search on the development subjects, run the
    protocol on each, and choose each method's by the search's metric."""
    from .tune import TuneOptions, run_tune

    result = run_tune(TuneOptions(out=Path(out), search=search, protocol_overrides=tuple(sets),
                                  subjects=tuple(subjects), device=device,
                                  cache_dir=Path(cache_dir) if cache_dir else None))
    click.echo((result.out / "tune.md").read_text(encoding="utf-8"))
    click.echo(f"Wrote tune.json, tune.md and tune.csv to {result.out}/")


def _register_subcommands():
    """The world and trainer command groups live with their packages."""
    from .train.cli import train_baseline
    from .world.cli import world

    main.add_command(train_baseline)
    main.add_command(world)


_register_subcommands()
