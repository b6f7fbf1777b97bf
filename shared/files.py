"""Atomic file writes: the one write-to-a-temporary-then-rename helper of Chorus.

A reader (another process, or a run resumed after a crash) sees either the old file or the new one, never a torn
one: the bytes go to a temporary file of its own beside the target (unique per writer, so two processes writing
the same file do not trip over each other's temporary), then ``os.replace`` renames it over the target.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["torch_save_atomic", "write_bytes_atomic", "write_text_atomic"]


def write_bytes_atomic(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, creating its parent directories; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a shipped file or checkpoint from other users
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path | str, text: str) -> Path:
    """``write_bytes_atomic`` of UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def torch_save_atomic(path: Path | str, obj: Any) -> Path:
    """``torch.save`` of ``obj`` to ``path``, atomically."""
    import torch  # here: the corpus tools (synthesis and its worker processes) write files without torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes_atomic(path, buffer.getvalue())
