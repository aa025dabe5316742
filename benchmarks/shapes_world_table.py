"""The trainers measured on the shapes world: every method for every shipped subject, then the table.

For each method (and each extra CAT weight), train one adapter per subject with the shapes-world
recipe (``protocols/shapes-world.yaml`` ``training:``), run the shapes-world protocol on it, and take
the ground truth from the world's probe. Subjects are pooled into one scored run per method (the
foundation's ``score``: the overall values are means over subjects with joint bootstrap CIs). The
base model (no adapter) is the reference row. Everything already on disk under ``--out`` is reused.

    python benchmarks/shapes_world_table.py --out runs/trainers [--methods cat lora] [--cat-weights 0.5 2 4]
        [--protocol-set generation.guidance_scale=3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

METHODS = ("cat", "lora", "dreambooth", "textual-inversion")
METRICS = ("identity", "kps", "preservation", "diversity_ratio")


def ensure_run(protocol, out: Path, adapter: Path | None, device: str) -> dict:
    from kps_bench.run import RunOptions, run_benchmark

    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    return run_benchmark(protocol, RunOptions(out=out, adapter=str(adapter) if adapter else None, device=device))


def pooled(protocol, runs: list[Path], out: Path, device: str) -> dict:
    """One scored run over every subject's images (references, base and adapter), for CIs over subjects."""
    from kps_bench.rundir import read_manifest, resolve_image_path, write_manifest
    from kps_bench.run import score_manifest

    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    records = []
    for run in runs:
        for r in read_manifest(run / "images.jsonl"):
            r.path = str(resolve_image_path(run, r).resolve())
            records.append(r)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "pooled.jsonl"
    write_manifest(manifest, records)
    return score_manifest(protocol, manifest, out, device)


def fmt(entry: dict | None) -> str:
    if not entry:
        return "-"
    return f"{entry['value']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"


def check_stamp(out: Path, protocol) -> None:
    """Refuse to reuse an ``--out`` made with another protocol or other base/encoder weights
    (a rebuilt world has the same protocol text but new weights)."""
    from kps_bench.models import combined_hash, folder_weight_hashes
    from kps_bench.rundir import write_json_atomic

    specs = {"base": protocol.resolve(protocol.base_model, "pipeline"),
             "clip": protocol.resolve(protocol.encoders.clip.arch), "dino": protocol.resolve(protocol.encoders.dino.model)}
    local = {k: Path(v).parent if Path(v).is_file() else Path(v) for k, v in specs.items() if Path(v).exists()}
    stamp = {"protocol_sha256": protocol.sha256,
             "weights_sha256": {k: combined_hash(folder_weight_hashes(d)) for k, d in local.items()}}
    p = out / "stamp.json"
    stale = json.loads(p.read_text()) != stamp if p.exists() else (out / "adapters").exists()
    if stale:
        print(f"error: {out} holds adapters or runs of another protocol or other model weights ({p} differs or "
              f"is missing); give a new --out or delete that folder.", file=sys.stderr)
        raise SystemExit(2)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(p, stamp)


def main(argv=None) -> None:
    from kps_bench.protocol import load_protocol
    from kps_bench.train import train
    from kps_bench.world import is_shapes_world
    from kps_bench.world.truth import truth as world_truth

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/trainers"))
    ap.add_argument("--protocol", default="shapes-world")
    ap.add_argument("--protocol-set", dest="protocol_sets", action="append", default=[], metavar="KEY=VALUE",
                    help="protocol override, e.g. generation.guidance_scale=3 (as kps-bench run --set)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--subjects", nargs="*", default=None)
    ap.add_argument("--cat-weights", nargs="*", type=float, default=[], help="extra CAT runs with these cat_weight")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="recipe override for every method")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    protocol = load_protocol(args.protocol, args.protocol_sets)

    def truth(run_dir, write=True):  # the probe's ground truth exists on the shapes world only
        if is_shapes_world(protocol.base_model):
            return world_truth(run_dir, write=write)
        return {"overall": {}, "subjects": {}}
    subjects = args.subjects or [s.name for s in protocol.evaluation_subjects]
    out: Path = args.out
    check_stamp(out, protocol)
    rows = []

    base_run = out / "runs" / "base"
    base = ensure_run(protocol, base_run, None, args.device)
    base_truth = truth(base_run, write=True)
    rows.append({"label": "base model", "results": base["overall"], "truth": base_truth["overall"], "train_s": []})

    variants = [(m, m, []) for m in args.methods]
    variants += [("cat", f"cat (λ={w:g})", [f"cat_weight={w:g}"]) for w in args.cat_weights]
    for method, label, extra in variants:
        slug = label.replace(" ", "").replace("(", "-").replace(")", "").replace("λ=", "w")
        runs, seconds = [], []
        for s in subjects:
            adapter = out / "adapters" / f"{slug}-{s}"
            if not adapter.exists():
                train(method, protocol, s, adapter, args.device, tuple(args.sets) + tuple(extra))
            seconds.append(json.loads((adapter / "training.json").read_text())["duration_s"])
            run = out / "runs" / f"{slug}-{s}"
            ensure_run(protocol, run, adapter, args.device)
            truth(run, write=True)
            runs.append(run)
        pooled_dir = out / "pooled" / slug
        res = pooled(protocol, runs, pooled_dir, args.device)
        gt = truth(pooled_dir, write=True)
        rows.append({"label": label, "results": res["overall"], "truth": gt["overall"], "train_s": seconds,
                     "truth_subjects": {k: v for k, v in gt["subjects"].items()}})

    head = ("| method | train s (mean / max) | identity | gt identity | kps | preservation | diversity_ratio | "
            "gt leakage | gt knowledge shift |")
    lines = [head, "|---" * 9 + "|"]
    for r in rows:
        t = r["truth"]
        secs = f"{statistics.mean(r['train_s']):.0f} / {max(r['train_s']):.0f}" if r["train_s"] else "-"
        g = lambda k: "-" if t.get(k) is None else f"{t[k]:.3f}"  # noqa: E731
        lines.append(f"| {r['label']} | {secs} | {fmt(r['results'].get('identity'))} | {g('true_identity')} | "
                     f"{fmt(r['results'].get('kps'))} | {fmt(r['results'].get('preservation'))} | "
                     f"{fmt(r['results'].get('diversity_ratio'))} | {g('true_leakage')} | "
                     f"{g('true_knowledge_shift')} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    (out / "table.json").write_text(json.dumps(rows, indent=2, default=str))
    print(table)


if __name__ == "__main__":
    main()
