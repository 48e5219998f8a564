"""Writes that are all or nothing: a reader (or a resume after a crash) sees the old file or
the new one, never half of one. The temporary file lives beside the destination, so the final
``os.replace`` never crosses filesystems (a tmpfs ``/tmp`` beside an NFS or other mount gives
``EXDEV`` for a rename)."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path


def _temporary_beside(path: Path) -> Path:
    """A new name beside ``path`` (not ``mkstemp``: its 0600 mode would make a shared file
    unreadable to the other users of a search folder)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


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
