"""Interruption (issue 17, section 4): a full disk stops run and train-baseline with exit 2 and a resume completes
identically; kill -9 anywhere loses nothing (a short benchmarks/kill_soak.py)."""

from __future__ import annotations

import builtins
import errno
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import kps_bench.generate
from kps_bench.cli import main
from kps_bench.train.checkpoint import Checkpoints

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "kill_soak.py"
TRAIN = ["--set", "steps=6", "--set", "resolution=32", "--set", "checkpoint_every=2", "--set",
         "gradient_checkpointing=false"]


def soak_module():
    spec = importlib.util.spec_from_file_location("kill_soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


class SmallDisk:
    """A folder on a 1 MiB tmpfs when this machine can mount one (root): ``fill()`` writes a file until the kernel
    says ENOSPC. Elsewhere the disk full is simulated: while full, opening a file under the folder for writing
    raises OSError(ENOSPC)."""

    def __init__(self, path: Path, monkeypatch):
        self.path, self.full = path, False
        self.real = bool(shutil.which("mount")) and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True).returncode == 0
        if not self.real:
            real_open = builtins.open

            def open_(file, mode="r", *args, **kwargs):
                if (self.full and isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+")
                        and Path(file).resolve().is_relative_to(path.resolve())):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
                return real_open(file, mode, *args, **kwargs)

            monkeypatch.setattr(builtins, "open", open_)

    def fill(self):
        self.full = True
        if self.real:
            fd = os.open(self.path / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(fd, bytes(4096))
            except OSError as e:
                assert e.errno == errno.ENOSPC
            finally:
                os.close(fd)

    def free(self):
        self.full = False
        (self.path / "filler").unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    (tmp_path / "disk").mkdir()
    disk = SmallDisk(tmp_path / "disk", monkeypatch)
    print("disk full:", "real tmpfs" if disk.real else "simulated (cannot mount a tmpfs here)")
    yield disk
    if disk.real:
        subprocess.run(["umount", str(disk.path)], check=True)


def fill_after(monkeypatch, disk, owner, name, calls):
    """Patch the write function ``owner.name`` so that the disk fills after its ``calls``-th call."""
    original, count = getattr(owner, name), []

    def write(*args, **kwargs):
        original(*args, **kwargs)
        count.append(1)
        if len(count) == calls:
            disk.fill()

    monkeypatch.setattr(owner, name, write)


def test_run_stops_on_a_full_disk_and_resumes_identically(tiny, tiny_protocol, tmp_path, small_disk, monkeypatch):
    def run(out):
        return cli("run", "--protocol", tiny_protocol, "--adapter", tiny / "lora", "--subject", "red-block", "--out",
                   out, "--device", "cpu", "--cache-dir", tmp_path / "cache")

    assert run(tmp_path / "ref").exit_code == 0
    shutil.rmtree(tmp_path / "cache")  # the run on the small disk makes its images again
    out = small_disk.path / "run"
    fill_after(monkeypatch, small_disk, kps_bench.generate, "save_png", 2)
    r = run(out)
    assert r.exit_code == 2, r.output
    assert f"No space left on device while writing '{out}'" in r.output and "re-run the same `kps-bench run`" in r.output
    assert "Traceback" not in r.output and not (out / "results.json").exists()
    small_disk.free()
    monkeypatch.undo()
    assert run(out).exit_code == 0
    assert soak_module().compare_runs(tmp_path / "ref", out) == []


def test_train_baseline_stops_on_a_full_disk_and_resumes_identically(tiny_protocol, tmp_path, small_disk,
                                                                     monkeypatch):
    def train(out, *extra):
        return cli("train-baseline", "lora", "--protocol", tiny_protocol, "--subject", "red-block", "--out", out,
                   "--device", "cpu", *TRAIN, *extra)

    assert train(tmp_path / "ref").exit_code == 0
    out = small_disk.path / "lora"
    fill_after(monkeypatch, small_disk, Checkpoints, "save", 1)
    r = train(out)
    assert r.exit_code == 2, r.output
    assert f"No space left on device while writing '{out}.partial'" in r.output and "--resume" in r.output
    assert not out.exists() and list((small_disk.path / "lora.partial" / "checkpoints").glob("step-00000002"))
    small_disk.free()
    monkeypatch.undo()
    r = train(out, "--resume")
    assert r.exit_code == 0, r.output
    assert soak_module().compare_trainings(tmp_path / "ref", out) == []


def test_the_soak_watches_its_reference_run_again_when_the_poll_missed_an_event(tmp_path, monkeypatch):
    soak = soak_module()
    out, cache = tmp_path / "run-ref", tmp_path / "cache"
    monkeypatch.setenv("KPS_BENCH_CACHE", str(cache))
    seen = []

    def watch_run(tiny, folder):  # a missed event leaves a finished run folder and cache behind
        seen.append((folder.exists(), cache.exists()))
        folder.mkdir()
        cache.mkdir()
        return {"images": 16} if len(seen) == 3 else None

    monkeypatch.setattr(soak, "watch_run", watch_run)
    assert soak.reference_run(tmp_path, out) == {"images": 16}
    assert seen == [(False, False)] * 3  # each attempt from scratch
    shutil.rmtree(out)
    shutil.rmtree(cache)
    with pytest.raises(SystemExit, match="too fast to watch in 2 attempts"):
        soak.reference_run(tmp_path, out, attempts=2)


@pytest.mark.slow
def test_kill_soak_short(tiny, tmp_path):
    r = subprocess.run([sys.executable, str(SOAK), "--runs", "3", "--trains", "2", "--methods", "lora", "--tiny",
                        str(tiny), "--work", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "run: 3/3 kills survived, 0 mismatch(es)" in r.stdout
    assert "train-baseline: 2/2 kills survived, 0 mismatch(es)" in r.stdout
