"""The demo's time before and after the shared base-image cache (issue #16 §4), measured on its evaluations.

The cache changes only the demo's runs (training makes no evaluation images), so this times the runs of a finished
demo folder (``kps-bench demo --out DIR``: its adapters are reused) twice, into fresh run folders:

- ``shared``: one empty cache for all runs, as the demo does now: the base images are made by the first run of each
  subject and linked into the others;
- ``per-run``: a new empty cache for every run, as before the cache: every run makes its own base images.

The two passes alternate subject by subject, so a slow spell of the machine falls on both. The demo's time before
the cache is its time now plus the difference.

    python benchmarks/demo_cache.py --demo kps-bench-demo [--seed N] [--out /tmp/demo-cache]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from kps_bench.demo import DemoOptions, folder
from kps_bench.protocol import load_protocol
from kps_bench.run import RunOptions, run_benchmark


def timed_run(protocol, out: Path, cache: Path, subject: str, adapter: Path | None) -> float:
    t0 = time.perf_counter()
    opts = dict(out=out, subjects=(subject,), device="cpu", cache_dir=cache)
    run_benchmark(protocol, RunOptions(adapter=str(adapter), **opts) if adapter else
                  RunOptions(adapter_kind="none", label="base", **opts))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, required=True, help="A finished `kps-bench demo --out` folder.")
    ap.add_argument("--seed", type=int, default=None,
                    help="The training seed of the adapters to use, for a demo made with --seed (folders SUBJECT-seedN).")
    ap.add_argument("--out", type=Path, default=None, help="Scratch folder (default: a temporary one, removed).")
    a = ap.parse_args()
    scratch = a.out or Path(tempfile.mkdtemp(prefix="demo-cache-"))
    d = DemoOptions(out=a.demo)
    protocol = load_protocol(d.protocol)
    subjects = [s.name for s in protocol.evaluation_subjects]
    seconds = {"shared": 0.0, "per-run": 0.0}
    shared = scratch / "shared-cache"
    for subject in subjects:
        # the base run, then each method's, as the demo runs them (its base run covers all subjects at once)
        jobs = [("base", None)] + [(m, a.demo / "adapters" / m / folder(subject, a.seed)) for m in d.methods]
        for name, adapter in jobs:
            for mode in seconds:
                cache = shared if mode == "shared" else scratch / f"cache-{mode}-{name}-{subject}"
                s = timed_run(protocol, scratch / mode / name / subject, cache, subject, adapter)
                seconds[mode] += s
                print(f"{mode:8s} {name:18s} {subject:14s} {s:7.1f} s", flush=True)
    print(f"\n{len(subjects) * (1 + len(d.methods))} runs: base and {len(d.methods)} methods on {len(subjects)} subjects")
    print(f"  one shared cache (now):      {seconds['shared']:7.1f} s")
    print(f"  a cache per run (before):    {seconds['per-run']:7.1f} s")
    print(f"  the cache saves:             {seconds['per-run'] - seconds['shared']:7.1f} s")
    if a.out is None:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
