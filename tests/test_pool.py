"""The job runner of `kps-bench demo --jobs`: workers pinned to devices, one task at a time each, logs per task."""

import os
import time

import pytest
import torch
from click.testing import CliRunner

from kps_bench.cli import main
from kps_bench.errors import UserError
from kps_bench.pool import Pool, Task, worker_gpus


def where(seconds: float) -> tuple[int, str | None]:
    """A task: says where it runs, on stdout (its log) and as its value, after holding its worker a while."""
    time.sleep(seconds)
    print(f"running in {os.getpid()}")
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")


def refuse(what: str):
    raise UserError(f"bad {what}")


def test_workers_are_pinned_to_their_gpu_and_log_each_task(tmp_path):
    """Two workers, each seeing one GPU of its own (CUDA_VISIBLE_DEVICES, set before anything uses CUDA): four tasks
    run two at a time, on both workers, each with its output in its log."""
    with Pool(["7", "3"]) as pool:
        running = [pool.submit(Task(f"task {i}", where, (1.0,), tmp_path / f"{i}.log")) for i in range(4)]
        done = [r.result() for r in running]
    gpu_of = {}
    for pid, gpu in done:
        assert gpu_of.setdefault(pid, gpu) == gpu
    assert sorted(gpu_of.values()) == ["3", "7"]
    for i, (pid, gpu) in enumerate(done):
        log = (tmp_path / f"{i}.log").read_text().splitlines()
        assert log[0].startswith(f"# task {i}, started ") and log[0].endswith(f" on GPU {gpu}")
        assert log[1:] == [f"running in {pid}"]


def test_a_failed_task_names_itself_and_its_log(tmp_path):
    with pytest.raises(UserError, match=rf"^bad input \(check input; its log: {tmp_path / 'c.log'}\)$"):
        with Pool([None]) as pool:
            pool.submit(Task("check input", refuse, ("input",), tmp_path / "c.log")).result()
    log = (tmp_path / "c.log").read_text()
    assert log.startswith("# check input, started ") and log.endswith(" on CPU\n")


def test_worker_count_and_bad_jobs(tmp_path):
    assert worker_gpus("cpu", None) == [None]  # a CPU demo runs its jobs one after the other, in process
    assert worker_gpus("cpu", 3) == [None, None, None]
    with pytest.raises(UserError, match=r"--jobs 0: give how many jobs run at once, 1 or more \(default: one per "
                                        r"visible GPU, 1 on the CPU\)\."):
        worker_gpus("cpu", 0)
    r = CliRunner().invoke(main, ["demo", "--jobs", "-1", "--device", "cpu", "--out", str(tmp_path / "demo")])
    assert r.exit_code == 2 and "Error: --jobs -1: give how many jobs run at once, 1 or more" in r.output
    assert not (tmp_path / "demo").exists()
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        assert len(worker_gpus("cuda", None)) == n
        with pytest.raises(UserError, match="--jobs 2 with --device cuda:0: the jobs would share that one device"):
            worker_gpus("cuda:0", 2)
