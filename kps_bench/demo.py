"""``kps-bench demo``: the whole story on the shapes world, from training to the leaderboard.

Trains every method for every subject with the protocol's recipes, runs the protocol on each
adapter (and once without adapter, as the base row), adds the shapes world's ground truth, and
writes the leaderboard (Markdown, CSV), the grid and the plot. Every step is cached in ``--out``:
a finished adapter or run is reused, an interrupted training resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

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
    reference: str = "lora"
    resamples: int = 1000


@dataclass
class DemoResult:
    out: Path
    markdown: str
    runs: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def _finished_run(run_dir: Path, protocol: Protocol, adapter_files: dict | None) -> bool:
    """A run that already holds results for this protocol and these adapter files (so it is skipped)."""
    f = run_dir / "results.json"
    if not f.is_file():
        return False
    prov = json.loads(f.read_text(encoding="utf-8")).get("provenance", {})
    same_adapter = adapter_files is None or (prov.get("adapter") or {}).get("files") == adapter_files
    return prov.get("protocol_sha256") == protocol.sha256 and same_adapter


def run_demo(opts: DemoOptions) -> DemoResult:
    from .figures import grid, plot
    from .leaderboard import build_tables, load_run, render
    from .models import resolve_adapter
    from .rundir import write_text_atomic
    from .run import RunOptions, run_benchmark
    from .train import train
    from .train.core import partial_dir

    t0 = time.perf_counter()
    out = Path(opts.out)
    protocol = load_protocol(opts.protocol, opts.protocol_overrides)
    subjects = [protocol.subject(s).name for s in opts.subjects] or [s.name for s in protocol.evaluation_subjects]
    run_dirs = []

    base_dir = out / "runs" / "base"
    if not _finished_run(base_dir, protocol, None):
        console.rule("base model (no adapter)")
        run_benchmark(protocol, RunOptions(out=base_dir, adapter_kind="none", subjects=tuple(subjects),
                                           device=opts.device, label="base", cache_dir=opts.cache_dir))
    run_dirs.append(base_dir)

    for method in opts.methods:
        for subject in subjects:
            adapter_dir = out / "adapters" / method / subject
            if not (adapter_dir / "training.json").is_file():
                console.rule(f"train {method} for {subject}")
                train(method, protocol, subject, adapter_dir, device=opts.device, overrides=opts.train_overrides,
                      resume=partial_dir(adapter_dir).exists())
            run_dir = out / "runs" / method / subject
            files = resolve_adapter(str(adapter_dir), "auto", False).files
            if not _finished_run(run_dir, protocol, files):
                console.rule(f"evaluate {method} for {subject}")
                run_benchmark(protocol, RunOptions(out=run_dir, adapter=str(adapter_dir), subjects=(subject,),
                                                   device=opts.device, cache_dir=opts.cache_dir))
            run_dirs.append(run_dir)

    runs = [load_run(d) for d in run_dirs]
    reference = opts.reference if opts.reference in opts.methods else None
    tables = build_tables(runs, reference=reference, resamples=opts.resamples)
    markdown = render(tables, "md")
    write_text_atomic(out / "leaderboard.md", markdown)
    write_text_atomic(out / "leaderboard.csv", render(tables, "csv"))
    write_text_atomic(out / "leaderboard.tex", render(tables, "tex"))
    grid(runs, out / "grid.png")
    plot(tables[0], out / "plot.png")
    return DemoResult(out, markdown, run_dirs, time.perf_counter() - t0)
