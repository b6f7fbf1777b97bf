"""What every `chorus` command prints when it cannot go on: one line naming the culprit, no traceback."""

from __future__ import annotations

from typing import NoReturn

import typer

__all__ = ["fail"]


def fail(message: str, *, code: int = 2) -> NoReturn:
    """``error: <message>`` on stderr and exit: status 2 for bad input (a usage error, the default), 1 for a
    failure of what the command started."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
