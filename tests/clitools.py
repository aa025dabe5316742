"""Shared helpers of the CLI tests: invoke `kps-bench` in process, and check a user error (exit 2, no traceback)."""

from click.testing import CliRunner

from kps_bench.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def expect_user_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in result.output, result.output
