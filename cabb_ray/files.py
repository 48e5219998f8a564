"""Writes that are all or nothing: a reader (or a resume after a crash) sees the old file or
the new one, never half of one. The temporary file lives beside the destination, so the final
``os.replace`` never crosses filesystems (a tmpfs ``/tmp`` beside an NFS or other mount gives
``EXDEV`` for a rename)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _temporary_beside(path: Path) -> Path:
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    return Path(name)


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def copy_atomic(source: str | Path, path: str | Path) -> Path:
    """Copy ``source`` to ``path`` (any filesystem to any other)."""
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
