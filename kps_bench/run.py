"""``kps-bench run`` and ``kps-bench score``: generate (or take) images, embed them once, score, record provenance."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from . import KPS_VERSION, __version__
from .cache import ImageCache
from .distributed import SINGLE, Ranks, launched
from .encoders import ClipEncoder, DinoEncoder, embed_images, loaded
from .errors import UserError, stop_when_disk_full
from .evaluate import check_seeds, compute_results
from .family import base_family
from .generate import Job, Plan, check_plan_size, generate, job_records, oom_guard, survey
from .lock import RUN_LOCK, exclusive
from .models import (AdapterInfo, LoadedModel, SpeedFlags, apply_adapter, check_adapter_fits, load_pipeline,
                     resolve_adapter, resolve_device)
from .protocol import Protocol, Subject
from .registry import encoders_needed
from .provenance import Timings, device_info, git_commit, now_iso, package_versions
from .rundir import (RESULTS, ImageRecord, atomic_path, check_run_files, check_writable, load_embeddings, read_manifest,
                     readable_image, remove_stale_temporaries, resolve_image_path, sha256_file, write_run)
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
    #: The shared image cache (None: ``$KPS_BENCH_CACHE``, else ``~/.cache/kps-bench``).
    cache_dir: Path | None = None
    speed: SpeedFlags = field(default_factory=SpeedFlags)


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
        if not readable_image(p):
            raise UserError(f"{where}: '{p}' is not a readable image. Remove it or replace it with a valid image file.")
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
            with atomic_path(dest) as tmp:
                shutil.copyfile(p, tmp)
        rows.append(ImageRecord(id=f"{subject.name}:reference:{p.stem}", path=os.path.relpath(dest, run_dir),
                                role="reference", subject=subject.name, sha256=sha))
    return rows


# ----------------------------------------------------------------------------- scoring


def load_encoders(protocol: Protocol, device: str, allow_unsafe_pickle: bool = False):
    """The protocol's CLIP and DINO encoders, each loaded when an enabled metric reads it: ``(clip or None, dino or
    None)``."""
    need = encoders_needed(protocol.metrics)
    enc = protocol.encoders
    clip = (ClipEncoder(protocol.resolve(enc.clip.arch, "clip"), protocol.resolve(enc.clip.weights),
                        device, enc.batch_size, allow_unsafe_pickle) if "clip" in need else None)
    dino = (DinoEncoder(protocol.resolve(enc.dino.model, "dino"), device, enc.batch_size, allow_unsafe_pickle)
            if "dino" in need else None)
    return clip, dino


def embed_and_score(records: list[ImageRecord], out: Path, protocol: Protocol, encoders, timings: Timings,
                    provenance: dict, ranks: Ranks = SINGLE) -> dict | None:
    """Encode every image once per encoder, compute metrics (and the shapes world's ground truth), and write
    images.jsonl, embeddings.safetensors and results.json as one unit. Under a launcher the ranks share the image
    encoding and rank 0 does the rest: the results are returned there, None on the other ranks. Raises a UserError
    after writing when more than half of the base or adapter images are flagged (results.json says ``status:
    failed``)."""
    clip, dino = encoders
    valid = [r for r in records if r.valid]
    paths = [resolve_image_path(out, r) for r in valid]

    def hashes_of_existing_images() -> list[str]:
        for r, p in zip(valid, paths):
            if not p.is_file():
                raise UserError(f"Image '{p}' listed in the manifest (id {r.id}) does not exist.")
        return [r.sha256 or sha256_file(p) for r, p in zip(valid, paths)]

    hashes = ranks.check(hashes_of_existing_images)
    tensors = {}
    encoders = loaded((clip, dino))
    provenance["encoders"] = {name: e.identity for name, e in encoders}
    with timings("encode"):
        for name, encoder in encoders:
            with progress(f"encode {name}", ranks.share(len(set(hashes)), encoder.batch_size)) as advance:
                def embed_my_batches(encoder=encoder, advance=advance) -> dict:
                    with oom_guard(f"encoding with {name}", encoder.batch_size, "--set encoders.batch_size=N"):
                        return embed_images(paths, encoder.encode_images, hashes, encoder.batch_size, advance, ranks)

                parts = ranks.gather(embed_my_batches)
            if ranks.main:
                by_hash = {h: e for part in parts for h, e in part.items()}
                for r, h in zip(valid, hashes):
                    tensors[f"{name}/{r.id}"] = by_hash[h]
    return ranks.check(lambda: score_and_write(records, tensors, out, protocol, clip, timings, provenance)
                       if ranks.main else None)


def score_and_write(records: list[ImageRecord], tensors: dict, out: Path, protocol: Protocol,
                    clip: ClipEncoder | None, timings: Timings, provenance: dict) -> dict:
    """Given the images' embeddings (``tensors``: ``clip/<id>``, ``dino/<id>`` for the loaded encoders): encode the
    prompts (with CLIP, when loaded), compute the metrics and the ground truth, and write the run folder's three
    files (see :func:`embed_and_score`)."""
    with timings("encode"):
        texts = {}
        for r in records:
            if r.valid and r.role != "reference" and clip is not None:
                texts[f"clip_text/{r.subject}/{r.prompt_index}"] = r.prompt_without_trigger
        keys = sorted(texts)
        for k, e in zip(keys, clip.encode_texts([texts[k] for k in keys]) if keys else []):
            tensors[k] = e
    b = protocol.bootstrap
    with timings("metrics"):
        results = compute_results(records, tensors, protocol.metrics, b.resamples, b.seed, b.confidence)
    base = Path(protocol.resolve(protocol.base_model, "pipeline"))
    if is_shapes_world(str(base)):
        from .world.truth import truth

        with timings("ground_truth"):
            results["ground_truth"] = truth(out, world_dir=base.parent, write=False, records=records)
    if results["counts"]["flagged"]:
        console.print(f"[yellow]warning:[/] {results['counts']['flagged']} image(s) are NaN or all black; they are "
                      f"flagged in images.jsonl and left out of the metrics with their seed partners (see "
                      f"counts.flagged, and each metric's flagged, in results.json).")
    for warning in results["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}")
    undefined = sorted({m for scope in [results["overall"], *results["metrics"].values()] for m, e in scope.items()
                        if isinstance(e, dict) and math.isnan(e["value"])})
    if undefined:
        console.print(f"[yellow]warning:[/] {', '.join(undefined)} could not be computed (NaN) for some subjects: "
                      f"they need trigger images and references (identity), the base model's trigger images "
                      f"(identity_base), seed-paired base and adapter images (preservation) or two images per prompt "
                      f"(diversity, preservation_floor), left after flagged images. They are "
                      f"NaN in results.json, and the leaderboard ranks such runs last.")
    failure = flagged_majority(records)
    provenance.update({"timings_s": timings.seconds, "end_time": now_iso()})
    results = {"kps_version": KPS_VERSION, "kps_bench_version": __version__, "status": "failed" if failure else "ok",
               **({"failure": failure} if failure else {}), **results, "provenance": provenance}
    write_run(out, records, tensors, results)
    if failure:
        raise UserError(f"{failure} The results are written to {out / RESULTS} and marked as failed.")
    return results


def flagged_majority(records: list[ImageRecord]) -> str | None:
    """A summary when more than half of the base or of the adapter images are flagged (NaN or black), else None."""
    for role in ("adapter", "base"):
        rows = [r for r in records if r.role == role]
        bad = sum(not r.valid for r in rows)
        if rows and bad * 2 > len(rows):
            return (f"{bad} of {len(rows)} {role} images are NaN or all black: the model or the generation settings "
                    f"are broken (e.g. generation.guidance_scale, steps, or float16 overflow; try --dtype float32).")
    return None


def recompute(run_dir: Path) -> dict:
    """Metrics recomputed from ``images.jsonl`` and ``embeddings.safetensors`` alone (no model, no image)."""
    results = json.loads((run_dir / RESULTS).read_text(encoding="utf-8"))
    check_run_files(run_dir, results)
    prot = results["provenance"]["protocol"]
    b = prot["bootstrap"]
    return compute_results(read_manifest(run_dir / "images.jsonl"), load_embeddings(run_dir / "embeddings.safetensors"),
                           prot["metrics"], b["resamples"], b["seed"], b["confidence"])


def base_provenance(protocol: Protocol, device: str, world_size: int, extra: dict) -> dict:
    """What every run and score records; ``world_size``: the processes that shared the work (1 without a
    launcher)."""
    return {
        "protocol": protocol.to_dict(), "protocol_sha256": protocol.sha256, "protocol_name": protocol.name,
        "protocol_version": protocol.version, "kps_version": KPS_VERSION, "packages": package_versions(),
        "git_commit": git_commit(), "device": device_info(device), "bootstrap_seed": protocol.bootstrap.seed,
        "start_time": now_iso(), "world_size": world_size, **extra,
    }


# ----------------------------------------------------------------------------- run


def select_subjects(protocol: Protocol, names: tuple[str, ...], adapter: AdapterInfo) -> list[Subject]:
    """``--subject`` names, else the adapter's training subject, else every evaluation subject (only without an
    adapter)."""
    if not names and adapter.training and adapter.training.get("subject"):
        name = adapter.training["subject"]
        if name not in {s.name for s in protocol.subjects}:
            raise UserError(f"The adapter's training.json (next to '{adapter.path}') names subject '{name}', which "
                            f"protocol '{protocol.name}' does not define (it has: "
                            f"{', '.join(s.name for s in protocol.subjects)}). Evaluate it with the protocol it was "
                            f"trained with, or pass --subject NAME.")
        names = (name,)
    if names:
        return [protocol.subject(n) for n in names]
    if adapter.kind != "none" and len(protocol.subjects) > 1:
        raise UserError(f"An adapter is trained for one subject, but protocol '{protocol.name}' has "
                        f"{len(protocol.subjects)} ({', '.join(s.name for s in protocol.subjects)}) and the adapter has "
                        f"no training.json naming one. Pass --subject NAME.")
    return list(protocol.evaluation_subjects)


@contextlib.contextmanager
def writing_run_folder(out: Path, command: str, ranks: Ranks = SINGLE):
    """Check that ``out`` can be written, then hold its lock (one writer at a time; stale temporaries are removed
    only under it) and stop with a clear error when its disk fills up. Under a launcher rank 0 alone holds the lock,
    and every other rank checks that it sees the same folder."""
    with contextlib.ExitStack() as held:
        def lock():
            check_writable(out)
            held.enter_context(stop_when_disk_full(out, f"re-run the same `{command}`"))
            held.enter_context(exclusive(out / RUN_LOCK, f"run folder '{out}'"))

        def see_lock():
            if not (out / RUN_LOCK).is_file():
                raise UserError(f"Rank {ranks.rank} does not see the run folder '{out}' that rank 0 locked: the ranks "
                                f"write one folder. Give an --out on a file system that every machine of the launch "
                                f"shares.")

        ranks.check(lambda: lock() if ranks.main else None)
        ranks.check(lambda: None if ranks.main else see_lock())
        yield


@dataclass
class Setup:
    """A run's inputs, opened and checked before its first image: what a run and its dry run start from."""

    adapter: AdapterInfo
    subjects: list[Subject]
    device: str
    cache: ImageCache
    encoders: tuple[ClipEncoder | None, DinoEncoder | None]
    base: LoadedModel
    plan: Plan
    batch_size: int

    @property
    def triggers(self) -> list[str]:
        return [s.trigger for s in self.subjects]

    def base_jobs(self, distinct: bool = False) -> Iterator[Job]:
        """The images the base pipeline makes (every image, without an adapter); each image once with ``distinct``."""
        jobs = self.plan.distinct() if distinct else self.plan.jobs()
        return (j for j in jobs if j.role == "base" or self.adapter.kind == "none")

    def adapter_jobs(self, distinct: bool = False) -> Iterator[Job]:
        jobs = () if self.adapter.kind == "none" else self.plan.distinct() if distinct else self.plan.jobs()
        return (j for j in jobs if j.role == "adapter")


def prepare(protocol: Protocol, opts: RunOptions, timings: Timings, ranks: Ranks = SINGLE) -> Setup:
    """Resolve and check every input, load the encoders and the base model (on this rank's device), and plan the
    images. Writes nothing."""
    adapter = resolve_adapter(opts.adapter, opts.adapter_kind, opts.allow_unsafe_pickle)
    subjects = select_subjects(protocol, opts.subjects, adapter)
    device = ranks.device(resolve_device(opts.device))
    cache = ImageCache.open(opts.cache_dir)
    check_reference_folders(protocol, subjects)
    for s in subjects:
        reference_images(protocol, s)
    g = protocol.generation
    check_plan_size(protocol, subjects, adapter.kind != "none", Path(opts.out) / "images")
    with timings("load_encoders"):  # every model and adapter is opened and checked before the first image
        encoders = load_encoders(protocol, device, opts.allow_unsafe_pickle)
    with timings("load_base"):
        base = load_pipeline(protocol.base_model, protocol.resolve(protocol.base_model, "pipeline"), device, g.dtype,
                             g.scheduler, opts.allow_unsafe_pickle)
        opts.speed.apply(base.pipe)
    if warning := base_family(base.pipe).resolution_warning(g.resolution):
        console.print(f"[yellow]warning:[/] {warning}")
    adapter.targets = check_adapter_fits(base.pipe, adapter, [s.trigger for s in subjects], opts.allow_unsafe_pickle)
    adapter_id = None if adapter.kind == "none" else {"kind": adapter.kind, "files": adapter.files}
    plan = Plan(protocol, subjects, base.identity, adapter_id, device.split(":")[0], opts.speed.enabled)
    return Setup(adapter, subjects, device, cache, encoders, base, plan, opts.batch_size or g.batch_size)


def run_benchmark(protocol: Protocol, opts: RunOptions) -> dict | None:
    """Generate base and adapter images for every subject and prompt, then score them into ``opts.out``. Under
    ``torchrun`` or ``accelerate launch`` the ranks share the generation and the encoding, and rank 0 writes the run
    folder: the results are returned there, None on the other ranks."""
    with launched() as ranks, writing_run_folder(Path(opts.out), "kps-bench run", ranks):
        return _run_benchmark(protocol, opts, ranks)


def _run_benchmark(protocol: Protocol, opts: RunOptions, ranks: Ranks) -> dict | None:
    timings = Timings()
    out = Path(opts.out)
    start = now_iso()
    setup = ranks.check(lambda: prepare(protocol, opts, timings, ranks))
    adapter, base, g = setup.adapter, setup.base, protocol.generation
    image_dir, batch, cache = out / "images", setup.batch_size, setup.cache

    def begin():
        """Rank 0: provenance, clean-up, references, the cached base images, and what is left to make."""
        provenance = base_provenance(protocol, setup.device, ranks.world, {
            "adapter": adapter.to_dict(), "label": opts.label or (adapter.training or {}).get("method"),
            "method": (adapter.training or {}).get("method") or opts.label or adapter.kind,
            "subjects": [s.name for s in setup.subjects], "batch_size": setup.batch_size,
            "seeds": {"generation": g.seed, "bootstrap": protocol.bootstrap.seed}, "overrides": list(opts.overrides),
            "start_time": start, "base_model": base.identity, "dtype": base.dtype,
            "speed": dataclasses.asdict(opts.speed),
        })
        image_dir.mkdir(parents=True, exist_ok=True)
        for folder in (out, image_dir):
            if n := remove_stale_temporaries(folder):
                console.print(f"removed {n} temporary file(s) that an interrupted run left in '{folder}'")
        if n := cache.remove_stale_temporaries():
            console.print(f"removed {n} temporary file(s) that interrupted writers left in the image cache "
                          f"'{cache.root}' over an hour ago")
        refs = [r for s in setup.subjects for r in reference_records(protocol, s, out)]
        taken = {"base": cache.take(setup.base_jobs(), image_dir)}
        return provenance, refs, taken, survey(setup.base_jobs(distinct=True), image_dir)

    def make(pipe, jobs, todo: int, present, what: str) -> int:
        """Every rank makes its share of the missing images; the number made by all."""
        with progress(f"generate {what}", ranks.share(todo, batch)) as advance:
            made = ranks.gather(lambda: generate(pipe, jobs, g, image_dir, batch, advance, present, ranks))
        return sum(made or ())

    made = {}
    with timings("generate_base"):
        provenance, refs, taken, (todo, present) = ranks.on_main(begin)
        made["base"] = make(base.pipe, setup.base_jobs(distinct=True), todo, present, "base")
        ranks.check(lambda: ranks.main and cache.keep(setup.base_jobs(), image_dir))
    if adapter.kind != "none":
        todo, present = ranks.on_main(lambda: survey(setup.adapter_jobs(distinct=True), image_dir))
        if todo:
            def load_adapter():
                pipe = apply_adapter(base, adapter, setup.triggers, setup.device, g.dtype, g.scheduler,
                                     opts.allow_unsafe_pickle)
                opts.speed.apply(pipe)
                return pipe

            with timings("load_adapter"):
                pipe = ranks.check(load_adapter)
            with timings("generate_adapter"):
                made["adapter"] = make(pipe, setup.adapter_jobs(distinct=True), todo, present, "adapter")
    provenance.update(images_made=made, images_from_cache=taken, image_cache=str(cache.root))
    records = ranks.on_main(lambda: refs + job_records(setup.plan.jobs(), image_dir, out))
    return embed_and_score(records, out, protocol, setup.encoders, timings, provenance, ranks)


def score_manifest(protocol: Protocol, manifest: Path, out: Path, device: str = "auto", label: str | None = None,
                   allow_unsafe_pickle: bool = False, allow_outside_paths: bool = False) -> dict | None:
    """Score images made elsewhere: references come from the manifest, or from the protocol's subjects. Image paths
    must stay inside the manifest's folder unless ``allow_outside_paths``; ``label`` names the method. Under a
    launcher the ranks share the encoding, and rank 0 returns the results (the others None)."""
    with launched() as ranks, writing_run_folder(Path(out), "kps-bench score", ranks):
        return _score_manifest(protocol, manifest, Path(out), device, label, allow_unsafe_pickle, allow_outside_paths,
                               ranks)


def read_checked_manifest(protocol: Protocol, manifest: Path, out: Path,
                          allow_outside_paths: bool) -> list[ImageRecord]:
    """The manifest's records, each image checked (subject, place, readable, sha256) and flagged when black, with
    paths made relative to ``out``, and their seeds checked (:func:`check_seeds`)."""
    records = read_manifest(manifest)
    if not any(r.role != "reference" for r in records):
        raise UserError(f"Manifest '{manifest}' lists no base or adapter image (role 'base' or 'adapter'), so there "
                        f"is nothing to score. Add one JSON line per generated image.")
    known = {s.name for s in protocol.subjects}
    root = manifest.parent.resolve()
    for r in records:
        if r.subject not in known:
            raise UserError(f"{manifest}: image '{r.id}' has subject '{r.subject}', which protocol '{protocol.name}' "
                            f"does not define (it has: {', '.join(sorted(known))}).")
        p = resolve_image_path(manifest.parent, r)
        if not allow_outside_paths and not p.resolve().is_relative_to(root):
            raise UserError(f"{manifest}: image '{r.id}' points to '{p}', outside the manifest's folder '{root}'. "
                            f"Move the images next to the manifest, or pass --allow-outside-paths if reading files "
                            f"elsewhere is intended.")
        if not p.is_file():
            raise UserError(f"{manifest}: image '{r.id}' points to '{p}', which does not exist.")
        if not readable_image(p):
            raise UserError(f"{manifest}: image '{r.id}' points to '{p}', which is not a readable image. Replace it "
                            f"with a PNG/JPEG file or remove its line.")
        sha = sha256_file(p)
        if r.sha256 is not None and r.sha256 != sha:
            raise UserError(f"{manifest}: image '{r.id}' has sha256 {r.sha256[:16]}... but '{p}' hashes to "
                            f"{sha[:16]}...: the file changed since the manifest was written. Fix or drop its "
                            f"'sha256' field.")
        r.path, r.sha256 = os.path.relpath(p.resolve(), out.resolve()), sha
        if not r.flags and is_black(p):
            r.flags = ["black"]
    check_seeds(records, str(manifest))
    return records


def _score_manifest(protocol: Protocol, manifest: Path, out: Path, device: str, label: str | None,
                    allow_unsafe_pickle: bool, allow_outside_paths: bool, ranks: Ranks) -> dict | None:
    timings = Timings()
    device = ranks.check(lambda: ranks.device(resolve_device(device)))
    records = ranks.on_main(lambda: read_checked_manifest(protocol, manifest, out, allow_outside_paths))
    with timings("load_encoders"):
        encoders = ranks.check(lambda: load_encoders(protocol, device, allow_unsafe_pickle))

    def begin():
        """Rank 0: the references the manifest lacks, and provenance."""
        out.mkdir(parents=True, exist_ok=True)
        have_refs = {r.subject for r in records if r.role == "reference"}
        refs = [r for s in protocol.subjects if s.name in {r.subject for r in records} and s.name not in have_refs
                for r in reference_records(protocol, s, out)]
        return refs, base_provenance(protocol, device, ranks.world, {
            "manifest": str(manifest.resolve()), "manifest_sha256": sha256_file(manifest), "label": label,
            "method": label or "base"})

    refs, provenance = ranks.on_main(begin)
    return embed_and_score(records + refs, out, protocol, encoders, timings, provenance, ranks)
