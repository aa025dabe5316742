"""The shared image cache: base images made once across methods' runs, self-contained run folders, atomic entries."""

import dataclasses
import errno
import json
import multiprocessing
import os
import shutil

import numpy as np
from click.testing import CliRunner
from PIL import Image

from kps_bench.cache import ENV, ImageCache, default_cache_dir, link_or_copy
from kps_bench.cli import main
from kps_bench.generate import save_png
from kps_bench.protocol import load_protocol
from kps_bench.run import RunOptions, recompute, run_benchmark
from kps_bench.rundir import readable_image, sha256_file


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def rows(run_dir, role):
    return {r["id"]: r for line in (run_dir / "images.jsonl").read_text().splitlines()
            if (r := json.loads(line))["role"] == role}


def test_a_second_methods_run_generates_no_base_image(tiny, tiny_protocol, tmp_path):
    protocol = load_protocol(str(tiny_protocol))
    cache = tmp_path / "cache"

    def run(name, adapter):
        return run_benchmark(protocol, RunOptions(out=tmp_path / name, adapter=str(tiny / adapter),
                                                  subjects=("red-block",), device="cpu", cache_dir=cache))

    lora = run("lora", "lora")
    # 2 prompts x 2 seeds: 8 base images (trigger-free and trigger prompts), made by the first run and kept in the cache
    assert lora["provenance"]["images_made"] == {"base": 8, "adapter": 8}
    assert lora["provenance"]["images_from_cache"] == {"base": 0}
    assert lora["provenance"]["image_cache"] == str(cache)
    assert len(list((cache / "images").rglob("*.png"))) == 8

    ti = run("ti", "textual-inversion")
    assert ti["provenance"]["images_made"] == {"base": 0, "adapter": 8}
    assert ti["provenance"]["images_from_cache"] == {"base": 8}
    first, second = rows(tmp_path / "lora", "base"), rows(tmp_path / "ti", "base")
    assert first.keys() == second.keys() and len(first) == 8
    for i, r in second.items():
        assert r["sha256"] == first[i]["sha256"] and r["path"] == first[i]["path"]
        # the same file, hard-linked from the cache into both run folders: nothing was written again
        assert os.path.samefile(tmp_path / "ti" / r["path"], tmp_path / "lora" / r["path"])
        assert os.stat(tmp_path / "ti" / r["path"]).st_nlink == 3

    # the run folders stand alone: without the cache, every image is there and the metrics recompute
    shutil.rmtree(cache)
    for name, res in (("lora", lora), ("ti", ti)):
        for r in rows(tmp_path / name, "base").values():
            assert sha256_file(tmp_path / name / r["path"]) == r["sha256"]
        again = recompute(tmp_path / name)["metrics"]
        assert json.dumps(again, sort_keys=True) == json.dumps(res["metrics"], sort_keys=True)  # NaN equal to NaN


def test_a_cache_entry_edited_through_a_run_folder_is_made_again(tiny, tiny_protocol, tmp_path):
    protocol = load_protocol(str(tiny_protocol), ["prompts=['a {subject}']"])
    opts = RunOptions(out=tmp_path / "a", adapter_kind="none", subjects=("red-block",), device="cpu",
                      cache_dir=tmp_path / "cache")
    first = run_benchmark(protocol, opts)
    victim = tmp_path / "a" / next(iter(rows(tmp_path / "a", "base").values()))["path"]
    good = victim.read_bytes()
    victim.write_bytes(b"")  # in place: the hard-linked cache entry is emptied too
    entry = tmp_path / "cache" / "images" / victim.name[:2] / victim.name
    assert entry.stat().st_size == 0
    again = run_benchmark(protocol, dataclasses.replace(opts, out=tmp_path / "b"))
    # without an adapter the base makes 4 images (2 seeds, trigger-free and trigger prompt): 3 cached, 1 made again
    assert again["provenance"]["images_made"] == {"base": 1} and again["provenance"]["images_from_cache"] == {"base": 3}
    made = tmp_path / "b" / "images" / victim.name
    assert entry.read_bytes() == made.read_bytes() and os.path.samefile(entry, made)
    # made alone rather than in a batch of 4: the same image within 1/255 per pixel (as for any batch size)
    (tmp_path / "good.png").write_bytes(good)
    assert np.abs(pixels(made) - pixels(tmp_path / "good.png")).max() <= 1
    assert again["counts"] == first["counts"]


def test_images_are_copied_where_hard_links_fail(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    src = tmp_path / "a.png"
    save_png(np.full((4, 4, 3), 0.25), src, [], {})
    monkeypatch.setattr(os, "link", no_links)
    link_or_copy(src, tmp_path / "cache" / "b.png")
    assert (tmp_path / "cache" / "b.png").read_bytes() == src.read_bytes()
    assert not os.path.samefile(src, tmp_path / "cache" / "b.png")
    assert os.listdir(tmp_path / "cache") == ["b.png"]


def _write_many(src, dest, n):
    for _ in range(n):
        link_or_copy(src, dest)


def test_two_writers_of_one_entry_leave_one_intact_file(tmp_path):
    sources = []
    for i, value in enumerate((0.2, 0.8)):
        sources.append(tmp_path / f"src{i}.png")
        save_png(np.full((64, 64, 3), value), sources[-1], [], {})
    dest = tmp_path / "cache" / "ab" / "entry.png"
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=_write_many, args=(s, dest, 200)) for s in sources]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
    assert [w.exitcode for w in writers] == [0, 0]
    assert readable_image(dest) and dest.read_bytes() in {s.read_bytes() for s in sources}
    assert os.listdir(dest.parent) == ["entry.png"]  # no temporary left


def test_default_location_and_a_cache_dir_that_cannot_be_written(tiny, tiny_protocol, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "from-env"))
    assert default_cache_dir() == tmp_path / "from-env" and ImageCache.open().root == tmp_path / "from-env"
    monkeypatch.delenv(ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "kps-bench"
    (tmp_path / "a-file").write_text("x")
    r = CliRunner().invoke(main, ["run", "--protocol", str(tiny_protocol), "--adapter-kind", "none", "--subject",
                                  "red-block", "--out", str(tmp_path / "run"), "--device", "cpu",
                                  "--cache-dir", str(tmp_path / "a-file" / "cache")])
    assert r.exit_code == 2, r.output
    assert "--cache-dir (or $KPS_BENCH_CACHE)" in r.output and "is a file, not a folder" in r.output
    assert not (tmp_path / "run").exists()


def test_temporaries_that_killed_writers_left_in_the_cache_are_removed_after_an_hour(tiny_protocol, tmp_path,
                                                                                     monkeypatch):
    """A copy cut short by a kill, or a dangling hard link, is removed by the next run once it is over an hour old;
    a younger one (maybe a live writer's: a hard link of an old entry counts from the link) and entries stay."""
    import time
    from types import SimpleNamespace

    from kps_bench import rundir

    cache = ImageCache.open(tmp_path / "cache")
    entry = cache.entry("ab" * 16)
    save_png(np.full((8, 8, 3), 0.5), entry, [], {})
    os.utime(entry, (time.time() - 86400,) * 2)  # made a day ago
    cut = entry.with_name(f".{entry.name}.0f0f.tmp")
    cut.write_bytes(entry.read_bytes()[:50])
    linked = entry.with_name(f".{entry.name}.1e1e.tmp")
    os.link(entry, linked)
    class_image = tmp_path / "cache" / "class-images" / ".c.png.x7y.tmp.png"
    class_image.parent.mkdir()
    class_image.write_bytes(b"\x89PNG")
    stale = {cut, linked, class_image}
    assert cache.remove_stale_temporaries() == 0 and all(p.exists() for p in stale)

    later = time.time() + 3601
    monkeypatch.setattr(rundir, "time", SimpleNamespace(time=lambda: later))
    r = CliRunner().invoke(main, ["run", "--protocol", str(tiny_protocol), "--adapter-kind", "none", "--subject",
                                  "red-block", "--set", "prompts=['a {subject}']", "--out", str(tmp_path / "run"),
                                  "--device", "cpu", "--cache-dir", str(cache.root)])
    assert r.exit_code == 0, r.output
    assert "removed 3 temporary file(s) that interrupted writers left in the image cache" in r.output
    assert not any(p.exists() for p in stale) and readable_image(entry)
    assert not [p for p in cache.root.rglob(".*") if p.is_file()]


def test_a_dead_writers_temporary_is_removed_at_once_a_live_or_foreign_ones_stay(tmp_path):
    """A temporary names its writer (PID and host): one of an ended process of this host is removed by the next
    cleanup whatever its age (a kill during DreamBooth's class images left one in the soak); those of a running
    process, of this process and of another host stay until they are an hour old."""
    import subprocess
    import sys

    from pathlib import Path

    from kps_bench.rundir import atomic_path, remove_stale_temporaries, temporary_prefix

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        target = tmp_path / "c.png"
        mine = Path(str(tmp_path / temporary_prefix(target)) + "a1b2c3.tmp.png")
        dead = Path(str(mine).replace(f".w{os.getpid()}@", f".w{ended.pid}@"))
        live = Path(str(mine).replace(f".w{os.getpid()}@", f".w{running.pid}@"))
        host = mine.name.split("@")[1].split(".")[0]
        foreign = Path(str(dead).replace(f"@{host}.", "@another-host."))
        for p in (mine, dead, live, foreign):
            p.write_bytes(b"\x89PNG")
        assert remove_stale_temporaries(tmp_path, 3600) == 1
        assert not dead.exists() and mine.exists() and live.exists() and foreign.exists()
        with atomic_path(target) as tmp:  # the atomic writer's and the cache's temporaries carry the tag
            assert tmp.name.startswith(f".c.png.w{os.getpid()}@{host}.") and tmp.name.endswith(".tmp.png")
    finally:
        running.kill()
        running.wait()
    assert remove_stale_temporaries(tmp_path, 3600) == 1 and not live.exists()
