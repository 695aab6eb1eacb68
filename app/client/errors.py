"""The client's one error type, its exit codes, and how a command reports it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

OK, FAILED, USAGE, AUTH, UNREACHABLE = 0, 1, 2, 3, 4
EXIT_CODES = (
    "Exit codes: 0 ok; 1 task failed, image not stored, or not found; "
    "2 usage or validation error; 3 token refused; 4 service unreachable."
)


class CliError(Exception):
    """A failure to report as one message (plus detail lines) and an exit code."""

    def __init__(self, message: str, exit_code: int, lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.message, self.exit_code, self.lines = message, exit_code, lines or []


@contextmanager
def reporting() -> Iterator[None]:
    """Turn a CliError into its message on stderr and its exit code."""
    try:
        yield
    except CliError as exc:
        typer.echo(f"imagetasks: {exc.message}", err=True)
        for line in exc.lines:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(exc.exit_code) from None
