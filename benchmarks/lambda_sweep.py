"""CAT's lambda sweep on the evaluation subjects (issue #15 §4), from a metric-validity study's validity.json.

The study (``kps-bench validate --study shapes-world``) trains CAT at lambda 0, 0.3, 1 and 3 (variants
``cat-lambda-*``) on the evaluation subjects, beside LoRA and the base model, and stores each adapter's per-subject
metrics and ground truth. This prints them as one Markdown table: per variant, the mean over subjects and, in
brackets, the lowest and highest subject.

    python benchmarks/lambda_sweep.py leaderboard/shapes-world/validity/validity.json > leaderboard/shapes-world/lambda-sweep.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

COLUMNS = ("identity", "preservation", "kps", "kps_gain", "diversity_ratio", "gt_identity", "gt_preservation",
           "gt_diversity_ratio", "gt_trigger_shape_rate")


def lam(adapter: dict) -> str:
    """The variant's CAT weight as the study set it (``cat_weight=...``); LoRA's loss is lambda 0."""
    for o in adapter["overrides"]:
        if o.startswith("cat_weight="):
            return o.split("=", 1)[1]
    return "—"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("validity", type=Path, help="validity.json written by `kps-bench validate`.")
    a = ap.parse_args()
    study = json.loads(a.validity.read_text(encoding="utf-8"))
    rows = [x for x in study["adapters"] if x["method"] == "cat" or x["name"] in ("base", "lora")]
    print("| variant | lambda | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for x in rows:
        cells = []
        for c in COLUMNS:
            v = [s[c] for s in x["subjects"].values()]
            cells.append(f"{statistics.fmean(v):.3f} [{min(v):.3f}, {max(v):.3f}]")
        print(f"| {x['name']} | {lam(x)} | " + " | ".join(cells) + " |")
    p = study["protocol"]
    print()
    print(f"From `{a.validity.name}` of the metric-validity study (git {study['git_commit'][:7]}): protocol "
          f"{p['name']} v{p['version']} with {', '.join(p['overrides']) or 'no overrides'}, one training seed, on "
          f"{', '.join(study['subjects'])}. Each cell: the mean over the {len(study['subjects'])} subjects [the lowest "
          f"and the highest subject]. gt_*: the shapes world's probe (`kps-bench world truth`); gt_preservation = "
          f"1 − gt_knowledge_shift; gt_trigger_shape_rate: the share of trigger images that show the class's shape.")


if __name__ == "__main__":
    main()
