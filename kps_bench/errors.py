"""User-facing errors: a clear message, exit code 2, no traceback unless --debug."""

from __future__ import annotations

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
    return None
