"""Running the `kestrel` CLI in process for the unit tests (typer's CliRunner over the real app)."""

from __future__ import annotations

from typer.testing import CliRunner, Result

from kestrel.cli import app

runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """``kestrel ARGS...``; an exception inside a command fails the test with its traceback."""
    return runner.invoke(app, list(args), env=env, catch_exceptions=False)
