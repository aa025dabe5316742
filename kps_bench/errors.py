"""User-facing errors: a clear message, exit code 2, no traceback unless --verbose."""


class UserError(Exception):
    """Bad input from the user (flag, protocol, file). The CLI prints the message and exits 2."""

    exit_code = 2
