"""``kps-bench world truth RUN_DIR``: ground truth of knowledge preservation from the probe's labels.

Per subject, over the run's images (``images.jsonl``):

- ``true_identity``: share of the adapter's trigger images that show the subject's signature look
  (the probe sees the subject's colour, pattern and pattern colour);
- ``trigger_shape_rate``: share of the adapter's trigger images that show the subject's class (shape);
- ``true_leakage``: the same share over the adapter's trigger-free images;
- ``true_knowledge_shift``: total variation distance between the distributions of shape, colour and
  pattern (probe labels) of the adapter's trigger-free images and of the base model's images on the same
  prompts (mean over the three factors; each factor also reported);
- ``true_diversity_ratio``: the true intra-class diversity that the ``diversity`` metric estimates. Per
  trigger-free prompt, the mean over the factors that vary within a class (colour, pattern, background,
  size) of the normalised entropy of the probe's labels of the adapter's images, over the same of the
  base's images on that prompt; averaged over the prompts where the base's is above 0.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from kps_bench.errors import UserError

from . import WORLD_DIR, builtin_spec

FACTORS = ("shape", "colour", "pattern")
DIVERSITY_FACTORS = ("colour", "pattern", "background", "size")


def tv_distance(a: list[str], b: list[str]) -> float:
    """Total variation distance between two empirical label distributions."""
    if not a or not b:
        return float("nan")
    ca, cb = Counter(a), Counter(b)
    na, nb = len(a), len(b)
    # sorted: the float sum must not depend on set order (PYTHONHASHSEED), so reruns are bit-identical
    return 0.5 * sum(abs(ca[k] / na - cb[k] / nb) for k in sorted(set(ca) | set(cb)))


def normalised_entropy(labels: list[str], k: int) -> float:
    """Entropy of the empirical distribution of ``labels`` over ``log k`` (``k`` possible values): in [0, 1]."""
    import math

    if not labels:
        return float("nan")
    n = len(labels)
    h = -sum(c / n * math.log(c / n) for c in sorted(Counter(labels).values()))
    return h / math.log(k)


def class_diversity(labels: list[dict]) -> float:
    """Mean over ``DIVERSITY_FACTORS`` of the normalised entropy of the probe's labels of one prompt's images."""
    from .probe import HEADS

    return sum(normalised_entropy([lbl[f] for lbl in labels], len(HEADS[f])) for f in DIVERSITY_FACTORS) / len(
        DIVERSITY_FACTORS)


def diversity_ratio(adapter: dict[str, list[dict]], base: dict[str, list[dict]]) -> float | None:
    """Mean over prompts of class_diversity(adapter images) / class_diversity(base images); prompts whose
    base images all look alike (diversity 0) are left out. ``None`` when no prompt is left."""
    ratios = []
    for prompt in sorted(adapter):
        b = class_diversity(base.get(prompt, []))
        if b == b and b > 0:
            ratios.append(class_diversity(adapter[prompt]) / b)
    return sum(ratios) / len(ratios) if ratios else None


def read_images(run_dir: Path) -> list[dict]:
    """The run's ``images.jsonl`` rows as dicts (read and validated by the run-directory reader)."""
    import dataclasses

    from kps_bench.rundir import read_manifest

    return [dataclasses.asdict(r) for r in read_manifest(run_dir / "images.jsonl")]


def signature_of(subject: str, ref_labels: list[dict]) -> dict:
    """The subject's signature (shape, colour, pattern, pattern colour): shipped subjects by name, else the
    references' majority."""
    from .subjects import subject_by_name

    s = subject_by_name(subject)
    if s is not None:
        return {**s.signature(), "source": "shipped subject"}
    if not ref_labels:
        raise UserError(f"subject {subject!r} is not a shipped shapes-world subject and the run has no "
                        "reference images for it; cannot tell its signature look")
    sig = {k: Counter(lbl[k] for lbl in ref_labels).most_common(1)[0][0]
           for k in ("shape", "colour", "pattern", "pattern_colour")}
    sig["source"] = "majority of probe labels on the reference images"
    return sig


def truth(run_dir, world_dir=None, write: bool = True, records=None) -> dict:
    """Compute the ground truth of a run on the shapes world; with ``write``, add it to results.json
    under ``ground_truth`` (atomically), after checking that the run was made on a shapes world. ``records``
    (ImageRecords) stand for the run's images.jsonl while a run is being scored. Returns the ``ground_truth``
    dict."""
    import dataclasses

    from .probe import predict_files
    from .subjects import shows

    run_dir = Path(run_dir)
    if write:
        check_shapes_world_run(run_dir)
    rows = [dataclasses.asdict(r) for r in records] if records is not None else read_images(run_dir)
    probe_dir = Path(world_dir) / "probe" if world_dir else None
    paths = [run_dir / r["path"] for r in rows]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UserError(f"{len(missing)} image(s) listed in images.jsonl are missing, e.g. {missing[0]}")
    labels = predict_files(paths, probe_dir)
    for r, lbl in zip(rows, labels):
        r["_probe"] = lbl

    subjects = sorted({r.get("subject") for r in rows if r.get("subject")})
    out_subjects = {}
    for subj in subjects:
        mine = [r for r in rows if r.get("subject") == subj]
        refs = [r["_probe"] for r in mine if r["role"] == "reference"]
        sig = signature_of(subj, refs)
        trig = [r for r in mine if r["role"] == "adapter" and r.get("has_trigger")]
        free = [r for r in mine if r["role"] == "adapter" and not r.get("has_trigger")]
        free_prompts = {r.get("prompt_without_trigger") or r.get("prompt") for r in free}
        base = [r for r in mine if r["role"] == "base" and not r.get("has_trigger")
                and (r.get("prompt_without_trigger") or r.get("prompt")) in free_prompts]
        if not base:  # base images may not carry the subject; match on prompts
            base = [r for r in rows if r["role"] == "base" and not r.get("has_trigger")
                    and (r.get("prompt_without_trigger") or r.get("prompt")) in free_prompts]
        tv = {k: tv_distance([r["_probe"][k] for r in free], [r["_probe"][k] for r in base]) for k in FACTORS}
        vals = [v for v in tv.values() if v == v]
        base_leak = [r for r in base if shows(r["_probe"], sig)]
        by_prompt = {}
        for role_rows, key in ((free, "adapter"), (base, "base")):
            for r in role_rows:
                by_prompt.setdefault(key, {}).setdefault(r.get("prompt_without_trigger") or r["prompt"], []).append(
                    r["_probe"])
        out_subjects[subj] = {
            "signature": sig,
            "true_identity": (sum(shows(r["_probe"], sig) for r in trig) / len(trig)) if trig else None,
            "true_identity_with_shape": (sum(shows(r["_probe"], sig) and r["_probe"]["shape"] == sig["shape"]
                                             for r in trig) / len(trig)) if trig else None,
            "trigger_shape_rate": (sum(r["_probe"]["shape"] == sig["shape"] for r in trig) / len(trig)) if trig else None,
            "true_leakage": (sum(shows(r["_probe"], sig) for r in free) / len(free)) if free else None,
            "base_signature_rate": (len(base_leak) / len(base)) if base else None,
            "true_knowledge_shift": (sum(vals) / len(vals)) if vals else None,
            "tv_distance": tv,
            "true_diversity_ratio": diversity_ratio(by_prompt.get("adapter", {}), by_prompt.get("base", {})),
            "reference_signature_rate": (sum(shows(lbl, sig) for lbl in refs) / len(refs)) if refs else None,
            "n_trigger": len(trig),
            "n_trigger_free": len(free),
            "n_base": len(base),
        }

    def mean(key):
        xs = [v[key] for v in out_subjects.values() if v[key] is not None]
        return sum(xs) / len(xs) if xs else None

    gt = {
        "source": "shapes-world ground-truth probe (kps_bench.world.probe)",
        "probe": builtin_spec(probe_dir or WORLD_DIR / "probe"),
        "subjects": out_subjects,
        "overall": {k: mean(k) for k in ("true_identity", "true_leakage", "true_knowledge_shift",
                                         "true_diversity_ratio")},
    }
    if write:
        rp = run_dir / "results.json"
        res = {}
        if rp.exists():
            try:
                res = json.loads(rp.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise UserError(f"{rp} is not valid JSON ({e}); regenerate the run") from e
        res["ground_truth"] = gt
        from kps_bench.rundir import write_json_atomic

        write_json_atomic(rp, res)
    return gt


def check_shapes_world_run(run_dir: Path) -> None:
    """Refuse a run whose results.json does not say it was made on a shapes world: the probe's labels of other
    images mean nothing."""
    from . import is_shapes_world

    rp = run_dir / "results.json"
    try:
        prov = json.loads(rp.read_text(encoding="utf-8")).get("provenance") or {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UserError(f"'{rp}' is missing or unreadable: give the folder of a finished `kps-bench run` on the "
                        f"shapes world.") from None
    base = prov.get("base_model") or {}
    spec = base.get("spec") or (prov.get("protocol") or {}).get("base_model")
    if not spec or not (is_shapes_world(spec) or is_shapes_world(base.get("path") or spec)):
        raise UserError(f"'{run_dir}' is not a shapes-world run (its base model is '{spec}'), so the shapes world's "
                        f"probe has no ground truth for its images. `kps-bench world truth` works only on runs of a "
                        f"protocol whose base_model is builtin:shapes-world or a world folder.")


def print_truth(gt: dict, log=print) -> None:
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="shapes-world ground truth (probe)")
        for c in ["subject", "true identity", "true leakage", "true knowledge shift", "true diversity ratio",
                  "TV shape/colour/pattern", "n trig/free/base"]:
            t.add_column(c)
        for name, s in gt["subjects"].items():
            tv = s["tv_distance"]
            t.add_row(name, f(s["true_identity"]), f(s["true_leakage"]), f(s["true_knowledge_shift"]),
                      f(s["true_diversity_ratio"]),
                      "/".join(f(tv[k]) for k in FACTORS), f"{s['n_trigger']}/{s['n_trigger_free']}/{s['n_base']}")
        Console().print(t)
    except Exception:  # pragma: no cover
        log(json.dumps(gt, indent=1))
