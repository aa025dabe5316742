"""One writer at a time: the lock of run folders and trained adapters (issue 17, section 4)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from kps_bench.cli import main
from kps_bench.errors import UserError
from kps_bench.lock import RUN_LOCK, exclusive, lock_beside

HOLD = "import sys; from kps_bench.lock import exclusive\nwith exclusive(sys.argv[1], 'x'):\n print('held', flush=True)\n sys.stdin.read()"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def holder(tmp_path):
    """Start another process that holds a lock file; yields ``start(lock_file) -> Popen``."""
    procs = []

    def start(lock_file):
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_file)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline() == "held\n"
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_second_holder_is_refused_with_who_holds_it(tmp_path):
    lock = tmp_path / "a" / "b" / RUN_LOCK
    with exclusive(lock, "run folder 'x'"):
        held = json.loads(lock.read_text())
        assert (held["pid"], held["host"]) == (os.getpid(), socket.gethostname()) and held["since"]
        with pytest.raises(UserError, match=re.escape(f"run folder 'x' is in use by another kps-bench process (PID "
                                                      f"{os.getpid()} on host {socket.gethostname()}, since "
                                                      f"{held['since']}, running `")):
            with exclusive(lock, "run folder 'x'"):
                pass
    assert not (tmp_path / "a").exists()  # the lock file and the folders it created are gone


def test_stale_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path, holder, capsys):
    lock = tmp_path / RUN_LOCK
    p = holder(lock)
    with pytest.raises(UserError, match=f"PID {p.pid} on host"):
        with exclusive(lock, "thing"):
            pass
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert json.loads(lock.read_text())["pid"] == p.pid  # left behind by the killed holder
    with exclusive(lock, "thing"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"left by PID {p.pid} on host" in " ".join(capsys.readouterr().err.split()) and not lock.exists()


def test_lock_of_another_host_is_not_taken_over(tmp_path):
    lock = tmp_path / RUN_LOCK
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then", "command": "kps-bench run"}))
    with pytest.raises(UserError, match="locked by PID 1 on host elsewhere.*delete the lock file"):
        with exclusive(lock, "thing"):
            pass


def test_run_and_score_refuse_a_folder_another_process_writes(tiny, tiny_protocol, tmp_path, holder):
    out = tmp_path / "run"
    p = holder(out / RUN_LOCK)
    r = cli("run", "--protocol", tiny_protocol, "--adapter-kind", "none", "--subject", "red-block", "--out", out,
            "--device", "cpu")
    assert r.exit_code == 2 and f"run folder '{out}' is in use by another kps-bench process (PID {p.pid}" in r.output
    assert "kill " + str(p.pid) in r.output and os.listdir(out) == [RUN_LOCK]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "images.jsonl").write_text("")
    r = cli("score", "--manifest", tmp_path / "m" / "images.jsonl", "--protocol", tiny_protocol, "--out", out)
    assert r.exit_code == 2 and f"(PID {p.pid}" in r.output
    p.kill()
    p.wait()
    r = cli("run", "--protocol", tiny_protocol, "--adapter-kind", "none", "--subject", "red-block", "--out", out,
            "--device", "cpu")
    assert r.exit_code == 0 and f"left by PID {p.pid} on host" in " ".join(r.output.split()), r.output
    assert (out / "results.json").is_file() and not (out / RUN_LOCK).exists()


def test_train_baseline_refuses_an_output_another_process_trains(tiny_protocol, tmp_path):
    out = tmp_path / "adapters" / "lora"
    with exclusive(lock_beside(out), "adapter"):
        r = cli("train-baseline", "lora", "--protocol", tiny_protocol, "--subject", "red-block", "--out", out,
                "--device", "cpu", "--set", "steps=2")
    assert r.exit_code == 2 and f"(PID {os.getpid()} on host" in r.output
    assert not out.exists() and not (tmp_path / "adapters" / "lora.partial").exists()
