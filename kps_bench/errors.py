"""User-facing errors: a clear message, exit code 2, no traceback unless --debug."""

from __future__ import annotations

import contextlib
import errno


class UserError(Exception):
    """Bad input from the user (flag, protocol, file). The CLI prints the message and exits 2."""

    exit_code = 2


def as_user_error(e: BaseException) -> UserError | None:
    """The user error behind a known exception type (a file the user pointed at that cannot be written or read),
    or None for a true bug."""
    if isinstance(e, OSError) and (isinstance(e, (PermissionError, IsADirectoryError, NotADirectoryError))
                                   or e.errno == errno.EROFS):
        where = f" '{e.filename}'" if e.filename else ""
        return UserError(f"Cannot access{where}: {e.strerror or e}. Choose a path you can write to (e.g. under your "
                         f"home folder) or fix its permissions, then re-run.")
    if is_disk_full(e):
        where = f" while writing '{e.filename}'" if getattr(e, "filename", None) else ""
        return UserError(f"No space left on device{where}. Free disk space there, then re-run the same command.")
    return None


def is_disk_full(e: BaseException | None) -> bool:
    """True when ``e``, or an exception it was raised from, is a full disk or quota. safetensors says so only in its
    message, and torch.save raises a RuntimeError from the writer's OSError."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def stop_when_disk_full(folder, resume: str):
    """Turn a full disk while the block writes ``folder`` into a UserError that names it; ``resume`` says how to
    continue once space is freed."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise UserError(f"No space left on device while writing '{folder}'. Free space on its disk (see `df -h "
                        f"{folder}`) or choose an --out on another disk, then {resume}: it continues from what was "
                        f"already written.") from None
