"""Atomic file writes: the one write-to-a-temporary-then-rename helper of Chorus.

A reader (another process, or a run resumed after a crash) sees either the old file or the new one, never a torn
one: the bytes go to ``<name>.tmp`` beside the target, then ``os.replace`` renames it over the target.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["torch_save_atomic", "write_bytes_atomic", "write_text_atomic"]


def write_bytes_atomic(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, creating its parent directories; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def write_text_atomic(path: Path | str, text: str) -> Path:
    """``write_bytes_atomic`` of UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def torch_save_atomic(path: Path | str, obj: Any) -> Path:
    """``torch.save`` of ``obj`` to ``path``, atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes_atomic(path, buffer.getvalue())
