"""``kps-bench demo``: the whole story on the shapes world, from training to the leaderboard.

Trains every method for every subject with the protocol's recipes, runs the protocol on each
adapter (and once without adapter, as the base row), adds the shapes world's ground truth, and
writes the leaderboard (Markdown, CSV), the grid and the plot. Every step is cached in ``--out``:
a finished adapter or run is reused, an interrupted training resumes. Beside the leaderboard it writes the subject x
method table of kps (``by-subject.md``) and, where it trained both, CAT against LoRA paired over (subject, training
seed) (``claims.md``: the paper's two claims, see :mod:`kps_bench.compare`). With several jobs (``--jobs``; on GPUs one per
visible GPU by default), the trainings and evaluations run at once in worker processes
(:mod:`kps_bench.pool`), each (method, subject) evaluated once its adapter and the base run are done, as in a
sequential demo, whose files they make.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .protocol import Protocol, load_protocol
from .ui import console


@dataclass
class DemoOptions:
    out: Path = Path("kps-bench-demo")
    protocol: str = "shapes-world"
    methods: tuple[str, ...] = ("cat", "lora", "dreambooth", "textual-inversion")
    subjects: tuple[str, ...] = ()
    #: ``--set`` overrides of the protocol, and recipe overrides applied to every method (e.g. ``steps=20``).
    protocol_overrides: tuple[str, ...] = ()
    train_overrides: tuple[str, ...] = ()
    device: str = "auto"
    #: The shared image cache (None: the default, see :func:`kps_bench.cache.default_cache_dir`).
    cache_dir: Path | None = None
    #: Jobs at once, each in a worker pinned to a device (None: one per visible GPU on CUDA, else 1).
    jobs: int | None = None
    reference: str = "lora"
    resamples: int = 1000
    #: Training seeds: each (method, subject) is trained once per seed into ``adapters/METHOD/SUBJECT-seedN`` (runs
    #: likewise), and the leaderboard averages over them. Empty: once, with the recipe's seed, into ``SUBJECT``.
    seeds: tuple[int, ...] = ()


@dataclass
class DemoResult:
    out: Path
    markdown: str
    runs: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def _finished_run(run_dir: Path, protocol: Protocol, adapter_files: dict | None) -> bool:
    """A run that already holds results for this protocol and these adapter files, and did not fail (so it is
    skipped)."""
    f = run_dir / "results.json"
    if not f.is_file():
        return False
    results = json.loads(f.read_text(encoding="utf-8"))
    prov = results.get("provenance", {})
    same_adapter = adapter_files is None or (prov.get("adapter") or {}).get("files") == adapter_files
    return prov.get("protocol_sha256") == protocol.sha256 and same_adapter and results.get("status") != "failed"


@functools.lru_cache(maxsize=8)
def _base_sha256(spec: str, resolved: str) -> str | None:
    """The base model's identity hash, computed once per process (a local folder's weights are hashed)."""
    from .models import model_identity

    return model_identity(spec, resolved).get("sha256")


def check_reusable(adapter_dir: Path, recipe_sha256: str, protocol: Protocol, asked_by: str) -> None:
    """Refuse to reuse a trained adapter folder whose training.json records another recipe than ``recipe_sha256``
    (what ``asked_by`` now asks for), or another base model than the protocol's: it would be reused silently."""
    training = json.loads((adapter_dir / "training.json").read_text(encoding="utf-8"))
    had = training.get("recipe_sha256")
    if had != recipe_sha256:
        raise UserError(f"'{adapter_dir}' was trained with recipe sha256 {str(had)[:12]}, but {asked_by} now asks for "
                        f"{recipe_sha256[:12]}. Delete that folder to retrain it, or give another --out.")
    base = _base_sha256(protocol.base_model, str(protocol.resolve(protocol.base_model, "pipeline")))
    had = (training.get("base_model") or {}).get("sha256")
    if had != base:
        raise UserError(f"'{adapter_dir}' was trained on a base model with sha256 {str(had)[:12]}, but protocol "
                        f"'{protocol.name}' now names '{protocol.base_model}' (sha256 {str(base)[:12]}). Delete "
                        f"that folder to retrain it, or give another --out.")


def evaluate_base(opts: DemoOptions, subjects: list[str]) -> Path:
    """The base row: every subject's images without an adapter (reused when done)."""
    from .run import RunOptions, run_benchmark

    protocol = load_protocol(opts.protocol, opts.protocol_overrides)
    run_dir = Path(opts.out) / "runs" / "base"
    if not _finished_run(run_dir, protocol, None):
        console.rule("base model (no adapter)")
        run_benchmark(protocol, RunOptions(out=run_dir, adapter_kind="none", subjects=tuple(subjects),
                                           device=opts.device, label="base", cache_dir=opts.cache_dir))
    return run_dir


def folder(subject: str, seed: int | None) -> str:
    """The folder of a subject's adapter and run under ``adapters/NAME`` and ``runs/NAME``: ``SUBJECT``, or
    ``SUBJECT-seedN`` for training seed N (as ``train-baseline --seed`` names it)."""
    return subject if seed is None else f"{subject}-seed{seed}"


def train_adapter(opts: DemoOptions, method: str, subject: str, name: str | None = None,
                  overrides: tuple[str, ...] = (), seed: int | None = None) -> Path:
    """``method``'s adapter for ``subject`` in ``adapters/NAME/SUBJECT`` (NAME: the method's, unless ``name`` is
    given; ``SUBJECT-seedN`` with a ``seed``), trained with the demo's recipe overrides, then ``overrides``, then
    the seed (reused when trained; resumed when interrupted)."""
    from .train import train
    from .train.output import partial_dir
    from .train.recipe import load_recipe

    name = name or method
    adapter_dir = Path(opts.out) / "adapters" / name / folder(subject, seed)
    protocol = load_protocol(opts.protocol, opts.protocol_overrides)
    overrides = opts.train_overrides + tuple(overrides) + (() if seed is None else (f"seed={seed}",))
    if (adapter_dir / "training.json").is_file():
        check_reusable(adapter_dir, load_recipe(method, protocol, overrides)[0].sha256, protocol,
                       f"{method}'s recipe for {subject}")
    else:
        console.rule(f"train {name} for {subject}" + ("" if seed is None else f" (seed {seed})"))
        train(method, protocol, subject, adapter_dir, device=opts.device, overrides=overrides,
              resume=partial_dir(adapter_dir).exists())
    return adapter_dir


def evaluate_adapter(opts: DemoOptions, name: str, subject: str, seed: int | None = None) -> Path:
    """The run ``runs/NAME/SUBJECT`` (``SUBJECT-seedN`` with a ``seed``) of the adapter of the same folder under
    ``adapters/NAME`` (NAME: a method in the demo) (reused when done for these adapter files)."""
    from .models import resolve_adapter
    from .run import RunOptions, run_benchmark

    protocol = load_protocol(opts.protocol, opts.protocol_overrides)
    adapter_dir = Path(opts.out) / "adapters" / name / folder(subject, seed)
    run_dir = Path(opts.out) / "runs" / name / folder(subject, seed)
    if not _finished_run(run_dir, protocol, resolve_adapter(str(adapter_dir), "auto", False).files):
        console.rule(f"evaluate {name} for {subject}" + ("" if seed is None else f" (seed {seed})"))
        run_benchmark(protocol, RunOptions(out=run_dir, adapter=str(adapter_dir), subjects=(subject,),
                                           device=opts.device, cache_dir=opts.cache_dir))
    return run_dir


def run_jobs(opts: DemoOptions, subjects: list[str], gpus: list[str | None]) -> None:
    """The base run and every (method, subject) training at once on the workers of ``gpus``; each evaluation once
    its training and the base run are done (its base images come from the image cache, as in a sequential demo)."""
    from .pool import Pool, Task

    logs = Path(opts.out) / "logs"
    pairs = [(m, s, seed) for m in opts.methods for s in subjects for seed in opts.seeds or (None,)]
    console.print(f"{1 + 2 * len(pairs)} jobs on {len(gpus)} workers "
                  f"({', '.join('CPU' if g is None else f'GPU {g}' for g in gpus)}); logs in {logs}/")
    with Pool(gpus) as pool:
        base = pool.submit(Task("evaluate base", evaluate_base, (opts, subjects), logs / "evaluate-base.log"))
        trained = [pool.submit(Task(f"train {m} for {folder(s, seed)}", train_adapter, (opts, m, s, None, (), seed),
                                    logs / f"train-{m}-{folder(s, seed)}.log")) for m, s, seed in pairs]
        base.result()
        evaluated = []
        for (m, s, seed), training in zip(pairs, trained):
            training.result()
            evaluated.append(pool.submit(Task(f"evaluate {m} for {folder(s, seed)}", evaluate_adapter,
                                              (opts, m, s, seed), logs / f"evaluate-{m}-{folder(s, seed)}.log")))
        for evaluation in evaluated:
            evaluation.result()


def run_demo(opts: DemoOptions) -> DemoResult:
    from . import compare
    from .figures import grid, plot
    from .leaderboard import build_tables, load_run, pivot, render
    from .pool import worker_gpus
    from .rundir import write_text_atomic

    t0 = time.perf_counter()
    out = Path(opts.out)
    protocol = load_protocol(opts.protocol, opts.protocol_overrides)
    subjects = [protocol.subject(s).name for s in opts.subjects] or [s.name for s in protocol.evaluation_subjects]
    gpus = worker_gpus(opts.device, opts.jobs)
    if len(gpus) > 1:
        run_jobs(opts, subjects, gpus)
    else:
        evaluate_base(opts, subjects)
        for method in opts.methods:
            for subject in subjects:
                for seed in opts.seeds or (None,):
                    train_adapter(opts, method, subject, seed=seed)
                    evaluate_adapter(opts, method, subject, seed)
    seeds = opts.seeds or (None,)
    run_dirs = [out / "runs" / "base"] + [out / "runs" / m / folder(s, seed) for m in opts.methods for s in subjects
                                          for seed in seeds]

    runs = [load_run(d) for d in run_dirs]
    reference = opts.reference if opts.reference in opts.methods else None
    tables = build_tables(runs, reference=reference, resamples=opts.resamples)
    markdown = render(tables, "md")
    write_text_atomic(out / "leaderboard.md", markdown)
    write_text_atomic(out / "leaderboard.csv", render(tables, "csv"))
    write_text_atomic(out / "leaderboard.tex", render(tables, "tex"))
    write_text_atomic(out / "by-subject.md", render([pivot(t) for t in tables], "md"))  # the same rows, pivoted
    if {"cat", "lora"} <= set(opts.methods):
        write_text_atomic(out / "claims.md", compare.render(compare.compare(runs, "cat", "lora",
                                                                           resamples=opts.resamples)))
    by_dir = dict(zip(run_dirs, runs))
    first_seed = [out / "runs" / "base"] + [out / "runs" / m / folder(s, seeds[0]) for m in opts.methods
                                             for s in subjects]
    grid([by_dir[d] for d in first_seed], out / "grid.png")  # the first seed's images: one row per method
    plot(tables[0], out / "plot.png")
    return DemoResult(out, markdown, run_dirs, time.perf_counter() - t0)
