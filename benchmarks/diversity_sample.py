"""How many class prompts and images per prompt does a single adapter's diversity_ratio need (issue #14 §2)?

Takes finished run folders made with many prompts and images per prompt (e.g. ``kps-bench run --set
generation.images_per_prompt=16 --set "prompts=[...]"``), and recomputes each run's per-subject diversity_ratio
95% CI (the run's own bootstrap over prompts, 1000 resamples) on sub-samples: the first P prompts of the run and the
first M seeds of each prompt, for every P in --prompts and M in --images. Prints one row per (run, subject) and a
summary per (P, M): the median and largest half-width and how many are within --target.

    python benchmarks/diversity_sample.py RUN_DIR... --prompts 11 --prompts 18 --images 4 --images 8 --images 16
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from kps_bench import metrics as M
from kps_bench.evaluate import subject_stats
from kps_bench.rundir import load_embeddings, read_manifest

NAMES = ("diversity_ratio",)


def subsample(records, n_prompts: int, n_images: int):
    """The references, and the generated images of the first ``n_prompts`` prompts and of each one's first
    ``n_images`` seeds (what a protocol with fewer prompts and images per prompt would have made)."""
    prompts = sorted({r.prompt_index for r in records if r.role != "reference"})[:n_prompts]
    keep = {(p, s) for p in prompts
            for s in sorted({r.seed for r in records if r.prompt_index == p and r.role != "reference"})[:n_images]}
    return [r for r in records if r.role == "reference" or (r.prompt_index, r.seed) in keep], len(prompts)


def half_width(records, emb, subject: str, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(diversity_ratio, half-width of its 95% bootstrap interval over prompts) of one subject."""
    st = subject_stats(records, emb, subject, NAMES)
    point = float(st.values(torch.ones(len(st.prompts), dtype=torch.float64))["diversity_ratio"])
    boot = st.values(M.bootstrap_weights(len(st.prompts), resamples, seed))["diversity_ratio"]
    lo, hi = M.percentile_interval(boot, 0.95)
    return point, (hi - lo) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--prompts", type=int, action="append", required=True)
    ap.add_argument("--images", type=int, action="append", required=True)
    ap.add_argument("--target", type=float, default=0.15)
    a = ap.parse_args()
    widths: dict[tuple[int, int], list[float]] = {}
    print("| run | subject | prompts | images/prompt | diversity_ratio | half-width |")
    print("|---|---|---|---|---|---|")
    for run in a.runs:
        records = [r for r in read_manifest(run / "images.jsonl") if r.role in ("reference", "base", "adapter")]
        emb = load_embeddings(run / "embeddings.safetensors")
        for subject in sorted({r.subject for r in records}):
            mine = [r for r in records if r.subject == subject]
            for p in a.prompts:
                for m in a.images:
                    sub, n_p = subsample(mine, p, m)
                    value, hw = half_width(sub, emb, subject)
                    widths.setdefault((n_p, m), []).append(hw)
                    print(f"| {run.name} | {subject} | {n_p} | {m} | {value:.3f} | {hw:.3f} |")
    print()
    print(f"| prompts | images/prompt | runs | median half-width | largest | within {a.target} |")
    print("|---|---|---|---|---|---|")
    for (p, m), w in sorted(widths.items()):
        print(f"| {p} | {m} | {len(w)} | {statistics.median(w):.3f} | {max(w):.3f} | "
              f"{sum(x <= a.target for x in w)}/{len(w)} |")


if __name__ == "__main__":
    main()
