"""The measuring parts of benchmarks/gpu_check.sh, on the shipped shapes world (no download).

``throughput``: generation and encoding images per second at several batch sizes, per dtype.
``agreement``: the same seeds made in float16 and in float32, compared pixel by pixel and through CLIP.
``compare-runs``: two ``kps-bench run`` folders (float16, float32) whose overall metrics must agree.
Each prints a table, writes JSON to ``--out`` and exits 1 when a stated tolerance is not met.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

#: float16 against float32: mean |pixel difference| (pixels in [0, 1]), the lowest CLIP cosine between the two
#: versions of an image, and the largest difference of an overall metric of `kps-bench run`.
TOLERANCES = {"pixel_mean_abs": 0.03, "clip_cos_min": 0.95, "metric_abs": 0.02}
METRICS = ("kps", "identity", "preservation", "clip_i", "clip_t", "dino")


def setup(device: str, dtype: str):
    from kps_bench.models import load_pipeline
    from kps_bench.protocol import load_protocol
    from kps_bench.run import load_encoders

    protocol = load_protocol("shapes-world")
    g = protocol.generation
    pipe = load_pipeline(protocol.base_model, protocol.resolve(protocol.base_model, "pipeline"), device, dtype,
                         g.scheduler).pipe
    return protocol, pipe, load_encoders(protocol, device)


def make(pipe, gen, n: int, batch: int):
    """``n`` images of class prompts, seeds 0..n-1, as ``[n, H, W, 3]`` floats."""
    import numpy as np

    from kps_bench.generate import sample

    prompts = [f"a {shape}" for shape in ("circle", "heart", "triangle", "cross", "square")] * n
    return np.concatenate([out for _, out in sample(pipe, prompts[:n], list(range(n)), gen, batch)])


def timed(fn) -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def throughput(args) -> tuple[dict, bool]:
    from kps_bench.generate import to_image

    rows = []
    for dtype in args.dtypes:
        protocol, pipe, encoders = setup(args.device, dtype)
        gen = dataclasses.replace(protocol.generation, steps=args.steps)
        make(pipe, gen, args.batches[0], args.batches[0])  # warm-up
        for b in args.batches:
            n = b * args.calls
            seconds = timed(lambda: make(pipe, gen, n, b))
            rows.append({"what": "generate", "dtype": dtype, "batch": b, "images": n, "img_per_s": n / seconds})
        images = [to_image(px) for px in make(pipe, gen, max(args.batches), max(args.batches))]
        for name, encoder in zip(("clip", "dino"), encoders):
            for b in args.batches:
                encoder.batch_size = b
                batch = (images * (1 + b * args.calls // len(images)))[: b * args.calls]
                encoder.encode_images(batch[:b])  # warm-up
                seconds = timed(lambda: encoder.encode_images(batch))
                rows.append({"what": f"encode {name}", "dtype": "float32", "batch": b, "images": len(batch),
                             "img_per_s": len(batch) / seconds})
    for r in rows:
        print(f"{r['what']:<12} {r['dtype']:<8} batch {r['batch']:>4}: {r['img_per_s']:10.1f} img/s")
    return {"steps": args.steps, "rows": rows}, True


def agreement(args) -> tuple[dict, bool]:
    import numpy as np
    import torch

    from kps_bench.generate import to_image

    made = {}
    for dtype in ("float32", "float16"):
        protocol, pipe, (clip, _) = setup(args.device, dtype)
        made[dtype] = make(pipe, protocol.generation, args.images, args.images)
        del pipe
    diff = np.abs(np.nan_to_num(made["float16"].astype(np.float64)) - made["float32"]).mean()
    e32, e16 = (clip.encode_images([to_image(px) for px in made[d]]) for d in ("float32", "float16"))
    cos = float(torch.nn.functional.cosine_similarity(e32, e16).min())
    nan = int(np.isnan(made["float16"]).any(axis=(1, 2, 3)).sum())
    ok = diff <= TOLERANCES["pixel_mean_abs"] and cos >= TOLERANCES["clip_cos_min"] and nan == 0
    print(f"float16 vs float32 over {args.images} images: mean |pixel diff| {diff:.4f} (<= "
          f"{TOLERANCES['pixel_mean_abs']}), min CLIP cosine {cos:.4f} (>= {TOLERANCES['clip_cos_min']}), "
          f"{nan} NaN images: {'OK' if ok else 'FAILED'}")
    return {"images": args.images, "pixel_mean_abs": float(diff), "clip_cos_min": cos, "nan_images": nan,
            "tolerances": TOLERANCES, "ok": bool(ok)}, bool(ok)


def compare_runs(args) -> tuple[dict, bool]:
    overall = [json.loads((Path(d) / "results.json").read_text())["overall"] for d in (args.fp16, args.fp32)]
    diffs = {m: abs(overall[0][m]["value"] - overall[1][m]["value"]) for m in METRICS if m in overall[1]}
    ok = all(d <= TOLERANCES["metric_abs"] for d in diffs.values())
    for m, d in diffs.items():
        print(f"{m:<14} float16 {overall[0][m]['value']:.4f}  float32 {overall[1][m]['value']:.4f}  |diff| {d:.4f}")
    print(f"overall metrics within {TOLERANCES['metric_abs']}: {'OK' if ok else 'FAILED'}")
    return {"abs_diff": diffs, "tolerance": TOLERANCES["metric_abs"], "ok": ok}, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--device", default="cuda")
    t.add_argument("--dtypes", nargs="+", default=["float16", "float32"])
    t.add_argument("--batches", nargs="+", type=int, default=[8, 32, 128])
    t.add_argument("--calls", type=int, default=3, help="timed calls per batch size")
    t.add_argument("--steps", type=int, default=25)
    a = sub.add_parser("agreement")
    a.add_argument("--device", default="cuda")
    a.add_argument("--images", type=int, default=64)
    c = sub.add_parser("compare-runs")
    c.add_argument("fp16")
    c.add_argument("fp32")
    args = parser.parse_args()
    result, ok = {"throughput": throughput, "agreement": agreement, "compare-runs": compare_runs}[args.command](args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
