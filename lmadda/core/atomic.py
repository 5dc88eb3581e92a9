"""The one way lmadda writes a file: whole or not at all."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

from lmadda.core.errors import LmaddaError


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(temporary)`, then rename into place; on any failure (a full disk, Ctrl-C) no partial file is left, and
    a file already at `path` (a checkpoint, a results table) stays as it was.

    The temporary file sits beside `path` (same folder, hence same file system, so the rename is atomic) and is
    named `.NAME.partial`: `write` must write exactly that path (give savers that append a suffix a file object)."""
    path = Path(path)
    if path.is_dir():
        raise LmaddaError(f"{path} is a folder; name the file to write, e.g. {path / 'out'}")
    temporary = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        temporary.replace(path)
    except OSError as error:
        raise LmaddaError(f"cannot write {path}: {error.strerror or error}") from error
    finally:
        with contextlib.suppress(OSError):  # gone already after the rename, or its folder could not be made
            temporary.unlink(missing_ok=True)
    return path
