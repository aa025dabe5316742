"""Exclusive locks: one writer at a time for a run folder, an adapter being trained, or a cache entry.

A lock is a file that holds its holder's PID, host, start time and command, locked with ``fcntl.flock`` so that
taking it is atomic. The kernel drops the flock when the holder dies, so a lock file left by a killed process is
taken over with a warning; the holder removes the file when it is done.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

from .errors import UserError

#: The lock file inside a run folder.
RUN_LOCK = ".kps-bench.lock"


def lock_beside(path: Path) -> Path:
    """The lock file of ``path`` in its parent folder (for a target that is renamed into place, like an adapter)."""
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def exclusive(lock_file: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold ``lock_file`` for the block; ``what`` names the locked thing in messages (e.g. "run folder 'runs/a'").
    Creates the lock's folders if needed and removes them again if the block leaves them empty. Raises a UserError
    naming the holder when another live process holds the lock."""
    lock_file = Path(lock_file)
    created = [p for p in [lock_file.parent, *lock_file.parent.parents] if not p.exists()]
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock_file, what)
    try:
        yield
    finally:
        os.unlink(lock_file)  # before unlocking: a process that opened it meanwhile sees the file gone and retries
        os.close(fd)
        with contextlib.suppress(OSError):  # stops at the first folder that is not empty
            for folder in created:
                folder.rmdir()


def _acquire(path: Path, what: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise UserError(f"The {what} is in use by another kps-bench process ({_describe(holder)}; lock file "
                            f"'{path}'). Wait for it to finish, or stop it{_kill_hint(holder)}, then re-run: two "
                            f"processes must not write one folder.") from None
        except OSError as e:
            os.close(fd)
            raise UserError(f"Cannot lock '{path}' ({e.strerror}): its file system does not support file locks. "
                            f"Choose a folder on a local disk.") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)  # the holder removed this file between our open and flock: lock the new one
    previous = _read(fd)
    if previous:
        if previous.get("host") != socket.gethostname():
            os.close(fd)
            raise UserError(f"The {what} is locked by {_describe(previous)} (lock file '{path}'). If that process "
                            f"is no longer running, delete the lock file and re-run.")
        from .ui import console

        console.print(f"[yellow]warning:[/] taking over the lock of the {what}, left by {_describe(previous)}, "
                      f"which is no longer running (killed or crashed).")
    from .provenance import now_iso

    program = Path(sys.argv[0]).name
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso(),
          "command": " ".join(["python -m kps_bench" if program == "__main__.py" else program, *sys.argv[1:]])}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    return fd


def _read(fd: int) -> dict:
    """The holder's record, or {} while a new holder has not written it yet (or it is unreadable)."""
    try:
        info = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "a process that is just starting"
    return (f"PID {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}, running "
            f"`{holder.get('command')}`")


def _kill_hint(holder: dict) -> str:
    return f" (kill {holder['pid']})" if holder.get("host") == socket.gethostname() and holder.get("pid") else ""
