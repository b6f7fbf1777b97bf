"""What `chorus` commands print: one line naming the culprit when they cannot go on, no traceback; and, for the
commands whose stdout is a result (``--json``), nothing else on stdout."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, NoReturn

import typer

__all__ = ["fail", "progress_to_stderr"]


def fail(message: str, *, code: int = 2) -> NoReturn:
    """``error: <message>`` on stderr and exit: status 2 for bad input (a usage error, the default), 1 for a
    failure of what the command started."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def progress_to_stderr() -> Iterator[None]:
    """Send file descriptor 1 to stderr inside the block: progress and the streamed output of subprocesses (e.g.
    `flwr run`) that write to it, so that stdout carries only the result printed after the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
