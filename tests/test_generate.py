"""Seed-paired generation: batch-size independence, content-addressed cache, resume after interruption."""

import itertools

import numpy as np
import pytest
from PIL import Image

from kps_bench.generate import Plan, generate, image_flags, read_flags, sample, save_png
from kps_bench.models import load_pipeline
from kps_bench.protocol import load_protocol
from kps_bench.rundir import atomic_path


@pytest.fixture(scope="module")
def setup(tiny_protocol):
    protocol = load_protocol(str(tiny_protocol), ["generation.images_per_prompt=3"])
    base = load_pipeline(protocol.base_model, protocol.resolve(protocol.base_model), "cpu", "float32", "ddim")
    plan = Plan(protocol, list(protocol.subjects[:1]), base.identity, None, "cpu")
    jobs = [j for j in plan.jobs() if j.role == "base" and not j.has_trigger]
    return protocol, base.pipe, jobs


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_jobs_are_seed_paired_and_content_addressed(tiny_protocol):
    protocol = load_protocol(str(tiny_protocol))
    model = {"sha256": "m"}
    jobs = list(Plan(protocol, list(protocol.subjects), model, {"files": {"a": "1"}}, "cpu").jobs())
    s, n_prompts, k = len(protocol.subjects), len(protocol.prompts), protocol.generation.images_per_prompt
    assert len(jobs) == s * n_prompts * k * 4
    by = {}
    for j in jobs:
        by.setdefault((j.subject, j.prompt_index, j.image_index), []).append(j)
    for group in by.values():
        assert len({j.seed for j in group}) == 1  # base and adapter, trigger-free and trigger, share the seed
    assert len({j.key for j in jobs}) == len(jobs)
    # without an adapter, base and adapter trigger-free images are the same image (same key)
    none = list(Plan(protocol, list(protocol.subjects[:1]), model, None, "cpu").jobs())
    free = [j for j in none if not j.has_trigger]
    assert len({j.key for j in free}) == len(free) // 2
    # the key moves with anything that changes pixels
    other = Plan(load_protocol(str(tiny_protocol), ["generation.steps=3"]), list(protocol.subjects[:1]), model, None,
                 "cpu").jobs()
    assert not {j.key for j in other} & {j.key for j in none}


def test_distinct_jobs_are_the_first_job_of_each_image_in_run_order(tiny_protocol):
    """Two subjects of one class share their base images (same prompt, same seed): counted once, as in run order."""
    protocol = load_protocol(str(tiny_protocol), ["subjects.1.class_noun=block", "generation.images_per_prompt=3"])
    for adapter in (None, {"files": {"a": "1"}}):
        plan = Plan(protocol, list(protocol.subjects), {"sha256": "m"}, adapter, "cpu")
        first = {}
        for j in plan.jobs():
            first.setdefault(j.key, j)
        distinct = list(plan.distinct())
        assert distinct == list(first.values())  # in run order, so they batch as every job did
        # per prompt and seed: one trigger-free image per model (shared by both subjects, and by both roles without
        # an adapter), and one trigger image per subject and model (the base's shared by both roles without one)
        assert len(distinct) == 2 * 3 * ((1 + 2) if adapter is None else (2 + 4))


def test_a_huge_plan_starts_generating_without_planning_every_image(tiny_protocol, setup, tmp_path):
    """With 10**8 images per prompt, the first batch is made after planning its own few jobs; the jobs (seeds,
    order, keys) are those of a small plan, which the first images of a huge one share."""
    protocol = load_protocol(str(tiny_protocol), ["generation.images_per_prompt=100000000"])
    _, pipe, _ = setup
    huge = Plan(protocol, list(protocol.subjects), {"sha256": "m"}, None, "cpu")
    small = Plan(load_protocol(str(tiny_protocol)), list(protocol.subjects[:1]), {"sha256": "m"}, None, "cpu")
    assert list(itertools.islice(huge.jobs(), 6)) == list(small.jobs())[:6]
    planned = 0

    def counted(jobs):
        nonlocal planned
        for j in jobs:
            planned += 1
            yield j

    def stop(n):
        raise Interrupt

    with pytest.raises(Interrupt):
        generate(pipe, counted(huge.jobs()), protocol.generation, tmp_path, 4, stop)
    # seeds 0 and 1 of the first prompt: the base's (= the adapter's) trigger-free and trigger images, 6 jobs for 4 images
    assert planned == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({j.filename for j in small.jobs()
                                                                 if j.image_index < 2 and j.prompt_index == 0})


def test_same_seed_same_image_whatever_the_batch_size(setup, tmp_path):
    protocol, pipe, jobs = setup
    for bs in (1, 4):
        assert generate(pipe, jobs, protocol.generation, tmp_path / f"bs{bs}", bs) == len(jobs)
    for j in jobs:
        a, b = pixels(tmp_path / "bs1" / j.filename), pixels(tmp_path / "bs4" / j.filename)
        assert np.abs(a - b).max() <= 1  # within 1/255 per pixel
    # and different seeds give different images
    assert np.abs(pixels(tmp_path / "bs1" / jobs[0].filename) - pixels(tmp_path / "bs1" / jobs[1].filename)).max() > 0


def test_png_writes_overlap_generation_and_give_the_same_bytes(setup, tmp_path):
    protocol, pipe, jobs = setup
    g = protocol.generation
    assert generate(pipe, jobs, g, tmp_path / "threaded", 4) == len(jobs) == 6
    # the same batches, each PNG written on this thread right after its batch
    for start, out in sample(pipe, [j.prompt for j in jobs], [j.seed for j in jobs], g, 4):
        for j, px in zip(jobs[start:], out):
            save_png(px, tmp_path / "direct" / j.filename, image_flags(px), {"prompt": j.prompt, "seed": j.seed})
    for j in jobs:
        assert (tmp_path / "threaded" / j.filename).read_bytes() == (tmp_path / "direct" / j.filename).read_bytes()


def test_a_failed_png_write_stops_the_generation(setup, tmp_path):
    protocol, pipe, jobs = setup
    (tmp_path / jobs[1].filename).mkdir()  # a folder where the PNG should go: the writer thread's rename fails
    with pytest.raises(IsADirectoryError):
        generate(pipe, jobs, protocol.generation, tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([jobs[0].filename, jobs[1].filename])


class Interrupt(Exception):
    pass


def test_interrupted_generation_resumes_without_loss_or_duplicates(setup, tmp_path):
    protocol, pipe, jobs = setup
    calls = []

    def stop_after_first_batch(n):
        calls.append(n)
        raise Interrupt

    with pytest.raises(Interrupt):
        generate(pipe, jobs, protocol.generation, tmp_path / "run", 2, stop_after_first_batch)
    made = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert len(made) == 2 and all(p.endswith(".png") and not p.startswith(".") for p in made)
    assert generate(pipe, jobs, protocol.generation, tmp_path / "run", 2) == len(jobs) - 2
    assert generate(pipe, jobs, protocol.generation, tmp_path / "run", 2) == 0
    generate(pipe, jobs, protocol.generation, tmp_path / "straight", 2)
    resumed = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert resumed == sorted(p.name for p in (tmp_path / "straight").iterdir())
    for name in resumed:
        assert np.array_equal(pixels(tmp_path / "run" / name), pixels(tmp_path / "straight" / name))


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.png"
    with pytest.raises(Interrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise Interrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_get_the_mode_of_a_plain_open_not_mkstemps_0600(tmp_path):
    """Results on a shared cluster must be readable by co-authors: the umask decides, as for open()."""
    import os

    from kps_bench.rundir import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "results.json", "{}")
        os.umask(0o077)
        write_text_atomic(tmp_path / "private.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600


def test_nan_and_black_images_are_flagged(tmp_path):
    from kps_bench.generate import save_png

    ok = np.full((8, 8, 3), 0.5)
    nan = ok.copy()
    nan[0, 0, 0] = np.nan
    black = np.zeros((8, 8, 3))
    assert image_flags(ok) == [] and image_flags(black) == ["black"]
    assert image_flags(nan) == ["nan"]
    assert image_flags(np.full((8, 8, 3), np.nan)) == ["nan", "black"]
    save_png(nan, tmp_path / "n.png", image_flags(nan), {})
    assert read_flags(tmp_path / "n.png") == ["nan"]
