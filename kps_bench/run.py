"""``kps-bench run`` and ``kps-bench score``: generate (or take) images, embed them once, score, record provenance."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import KPS_VERSION, __version__
from .encoders import ClipEncoder, DinoEncoder, embed_images
from .errors import UserError
from .evaluate import compute_results
from .generate import generate, job_records, oom_guard, plan_jobs
from .models import AdapterInfo, apply_adapter, load_pipeline, resolve_adapter, resolve_device
from .protocol import Protocol, Subject
from .provenance import Timings, device_info, git_commit, now_iso, package_versions
from .rundir import (ImageRecord, load_embeddings, read_manifest, resolve_image_path, save_embeddings,
                     sha256_file, write_json_atomic, write_manifest)
from .ui import console, progress
from .world import is_shapes_world

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class RunOptions:
    """What ``kps-bench run`` was asked to do beyond the protocol."""

    out: Path
    adapter: str | None = None
    adapter_kind: str = "auto"
    subjects: tuple[str, ...] = ()
    device: str = "auto"
    batch_size: int | None = None
    allow_unsafe_pickle: bool = False
    label: str | None = None
    overrides: tuple[str, ...] = field(default_factory=tuple)


# ----------------------------------------------------------------------------- references


def check_reference_folders(protocol: Protocol, subjects) -> None:
    """One error that names every subject whose reference folder does not exist."""
    folders = [(s, protocol.references_dir(s)) for s in subjects]
    missing = [(s, folder) for s, folder in folders if not folder.is_dir()]
    if not missing:
        return
    if protocol.references_root:
        raise UserError(f"Protocol '{protocol.name}': {len(missing)} of {len(subjects)} subject folders do not exist "
                        f"under references_root '{protocol.references_root}' (resolved to '{missing[0][1].parent}'): "
                        f"{', '.join(s.references for s, _ in missing)}. Point references_root at the folder that "
                        f"holds one folder of real images per subject: --set references_root=PATH"
                        f"{' or the environment variable it names' if '$' in protocol.references_root else ''}.")
    raise UserError("; ".join(f"subjects[{s.name}].references: folder '{s.references}' (resolved to '{folder}') does "
                              f"not exist" for s, folder in missing)
                    + ". Point each at a folder of the subject's real images (png/jpg).")


def reference_images(protocol: Protocol, subject: Subject) -> list[Path]:
    """The subject's reference images; a clear error when the folder is missing, empty or holds non-images."""
    from PIL import Image, UnidentifiedImageError

    check_reference_folders(protocol, [subject])
    folder = protocol.references_dir(subject)
    where = f"subjects[{subject.name}].references"
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        what = f"holds no images (found {', '.join(p.name for p in files[:3])})" if files else "is empty"
        raise UserError(f"{where}: folder '{folder}' {what}. Put the subject's reference images "
                        f"({', '.join(IMAGE_SUFFIXES)}) there.")
    for p in images:
        try:
            with Image.open(p) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError):
            raise UserError(f"{where}: '{p}' is not a readable image. Remove it or replace it with a valid image file.") from None
    return images


def is_black(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        return max(hi for _, hi in im.convert("RGB").getextrema()) == 0


def reference_records(protocol: Protocol, subject: Subject, run_dir: Path) -> list[ImageRecord]:
    """Copy the references into ``run_dir/images`` (content-addressed) so a run directory is self-contained."""
    rows = []
    for p in reference_images(protocol, subject):
        sha = sha256_file(p)
        dest = run_dir / "images" / f"ref-{sha[:32]}{p.suffix.lower()}"
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.copyfile(p, tmp)
            os.replace(tmp, dest)
        rows.append(ImageRecord(id=f"{subject.name}:reference:{p.stem}", path=os.path.relpath(dest, run_dir),
                                role="reference", subject=subject.name, sha256=sha))
    return rows


# ----------------------------------------------------------------------------- scoring


def embed_and_score(records: list[ImageRecord], out: Path, protocol: Protocol, device: str, timings: Timings,
                    provenance: dict) -> dict:
    """Encode every image once per encoder, store embeddings, compute metrics (and the shapes world's ground
    truth), write results.json."""
    need_dino = any(m in protocol.metrics for m in ("dino", "diversity", "vendi"))
    enc = protocol.encoders
    with timings("load_encoders"):
        clip = ClipEncoder(protocol.resolve(enc.clip.arch, "clip"), protocol.resolve(enc.clip.weights),
                           device, enc.batch_size)
        dino = DinoEncoder(protocol.resolve(enc.dino.model, "dino"), device, enc.batch_size) if need_dino else None
    valid = [r for r in records if r.valid]
    paths = [resolve_image_path(out, r) for r in valid]
    for r, p in zip(valid, paths):
        if not p.is_file():
            raise UserError(f"Image '{p}' listed in the manifest (id {r.id}) does not exist.")
    hashes = [r.sha256 or sha256_file(p) for r, p in zip(valid, paths)]
    tensors = {}
    encoders = [("clip", clip)] + ([("dino", dino)] if dino else [])
    with timings("encode"):
        for name, encoder in encoders:
            distinct = len(set(hashes))
            with progress(f"encode {name}", distinct) as advance, oom_guard(f"encoding with {name}", enc.batch_size,
                                                                            "--set encoders.batch_size=N"):
                by_hash = embed_images(paths, encoder.encode_images, hashes, advance)
            for r, h in zip(valid, hashes):
                tensors[f"{name}/{r.id}"] = by_hash[h]
        texts = {}
        for r in valid:
            if r.role != "reference":
                texts[f"clip_text/{r.subject}/{r.prompt_index}"] = r.prompt_without_trigger
        keys = sorted(texts)
        for k, e in zip(keys, clip.encode_texts([texts[k] for k in keys])):
            tensors[k] = e
    save_embeddings(out / "embeddings.safetensors", tensors)
    provenance["encoders"] = {"clip": clip.identity, **({"dino": dino.identity} if dino else {})}
    b = protocol.bootstrap
    with timings("metrics"):
        results = compute_results(records, tensors, protocol.metrics, b.resamples, b.seed, b.confidence)
    base = Path(protocol.resolve(protocol.base_model, "pipeline"))
    if is_shapes_world(str(base)):
        from .world.truth import truth

        with timings("ground_truth"):
            results["ground_truth"] = truth(out, world_dir=base.parent, write=False)
    if results["counts"]["flagged"]:
        console.print(f"[yellow]warning:[/] {results['counts']['flagged']} image(s) are NaN or all black; they are "
                      f"flagged in images.jsonl and left out of the metrics (see counts.flagged in results.json).")
    provenance.update({"timings_s": timings.seconds, "end_time": now_iso()})
    results = {"kps_version": KPS_VERSION, "kps_bench_version": __version__, **results, "provenance": provenance}
    write_json_atomic(out / "results.json", results)
    return results


def recompute(run_dir: Path) -> dict:
    """Metrics recomputed from ``images.jsonl`` and ``embeddings.safetensors`` alone (no model, no image)."""
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    prot = results["provenance"]["protocol"]
    b = prot["bootstrap"]
    return compute_results(read_manifest(run_dir / "images.jsonl"), load_embeddings(run_dir / "embeddings.safetensors"),
                           prot["metrics"], b["resamples"], b["seed"], b["confidence"])


def base_provenance(protocol: Protocol, device: str, extra: dict) -> dict:
    return {
        "protocol": protocol.to_dict(), "protocol_sha256": protocol.sha256, "protocol_name": protocol.name,
        "protocol_version": protocol.version, "kps_version": KPS_VERSION, "packages": package_versions(),
        "git_commit": git_commit(), "device": device_info(device), "bootstrap_seed": protocol.bootstrap.seed,
        "start_time": now_iso(), **extra,
    }


# ----------------------------------------------------------------------------- run


def select_subjects(protocol: Protocol, names: tuple[str, ...], adapter: AdapterInfo) -> list[Subject]:
    """``--subject`` names, else the adapter's training subject, else every evaluation subject (only without an
    adapter)."""
    if not names and adapter.training and adapter.training.get("subject"):
        names = (adapter.training["subject"],)
    if names:
        return [protocol.subject(n) for n in names]
    if adapter.kind != "none" and len(protocol.subjects) > 1:
        raise UserError(f"An adapter is trained for one subject, but protocol '{protocol.name}' has "
                        f"{len(protocol.subjects)} ({', '.join(s.name for s in protocol.subjects)}) and the adapter has "
                        f"no training.json naming one. Pass --subject NAME.")
    return list(protocol.evaluation_subjects)


def run_benchmark(protocol: Protocol, opts: RunOptions) -> dict:
    """Generate base and adapter images for every subject and prompt, then score them into ``opts.out``."""
    timings = Timings()
    adapter = resolve_adapter(opts.adapter, opts.adapter_kind, opts.allow_unsafe_pickle)
    subjects = select_subjects(protocol, opts.subjects, adapter)
    device = resolve_device(opts.device)
    out = Path(opts.out)
    check_reference_folders(protocol, subjects)
    (out / "images").mkdir(parents=True, exist_ok=True)
    refs = [r for s in subjects for r in reference_records(protocol, s, out)]
    g = protocol.generation
    batch = opts.batch_size or g.batch_size
    provenance = base_provenance(protocol, device, {
        "adapter": adapter.to_dict(), "label": opts.label or (adapter.training or {}).get("method"),
        "method": (adapter.training or {}).get("method") or opts.label or adapter.kind,
        "subjects": [s.name for s in subjects], "batch_size": batch,
        "seeds": {"generation": g.seed, "bootstrap": protocol.bootstrap.seed}, "overrides": list(opts.overrides),
    })
    with timings("load_base"):
        base = load_pipeline(protocol.base_model, protocol.resolve(protocol.base_model, "pipeline"), device, g.dtype,
                             g.scheduler, opts.allow_unsafe_pickle)
    provenance.update(base_model=base.identity, dtype=base.dtype)
    adapter_id = None if adapter.kind == "none" else {"kind": adapter.kind, "files": adapter.files}
    jobs = plan_jobs(protocol, subjects, base.identity, adapter_id, device.split(":")[0])
    image_dir = out / "images"
    made = {}
    with timings("generate_base"):
        base_jobs = [j for j in jobs if j.role == "base" or adapter.kind == "none"]
        with progress("generate base", len({j.key for j in base_jobs})) as advance:
            made["base"] = generate(base.pipe, base_jobs, g, image_dir, batch, advance)
    if adapter.kind != "none":
        adapter_jobs = [j for j in jobs if j.role == "adapter"]
        todo = [j for j in adapter_jobs if not (image_dir / j.filename).is_file()]
        if todo:
            with timings("load_adapter"):
                pipe = apply_adapter(base, adapter, [s.trigger for s in subjects], device, g.dtype, g.scheduler,
                                     opts.allow_unsafe_pickle)
            with timings("generate_adapter"), progress("generate adapter", len({j.key for j in todo})) as advance:
                made["adapter"] = generate(pipe, adapter_jobs, g, image_dir, batch, advance)
    provenance["images_made"] = made
    records = refs + job_records(jobs, image_dir, out)
    write_manifest(out / "images.jsonl", records)
    return embed_and_score(records, out, protocol, device, timings, provenance)


def score_manifest(protocol: Protocol, manifest: Path, out: Path, device: str = "auto") -> dict:
    """Score images made elsewhere: references come from the manifest, or from the protocol's subjects."""
    timings = Timings()
    device = resolve_device(device)
    records = read_manifest(manifest)
    out.mkdir(parents=True, exist_ok=True)
    known = {s.name for s in protocol.subjects}
    for r in records:
        if r.subject not in known:
            raise UserError(f"{manifest}: image '{r.id}' has subject '{r.subject}', which protocol '{protocol.name}' "
                            f"does not define (it has: {', '.join(sorted(known))}).")
        p = resolve_image_path(manifest.parent, r)
        if not p.is_file():
            raise UserError(f"{manifest}: image '{r.id}' points to '{p}', which does not exist.")
        r.path = os.path.relpath(p.resolve(), out.resolve())
        r.sha256 = r.sha256 or sha256_file(p)
        if not r.flags and is_black(p):
            r.flags = ["black"]
    have_refs = {r.subject for r in records if r.role == "reference"}
    for s in protocol.subjects:
        if s.name in {r.subject for r in records} and s.name not in have_refs:
            records += reference_records(protocol, s, out)
    write_manifest(out / "images.jsonl", records)
    provenance = base_provenance(protocol, device, {"manifest": str(manifest.resolve()),
                                                    "manifest_sha256": sha256_file(manifest)})
    return embed_and_score(records, out, protocol, device, timings, provenance)
