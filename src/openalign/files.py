"""Atomic file writes: a reader (or a resumed run) never sees half a file."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, shared: bool = False) -> None:
    """Call write(temporary) on a temporary file beside path, then rename it into place.

    The temporary file is NAME.tmp, a fixed name, so what a crashed run left behind is overwritten by the rerun
    and a resumed folder ends up with exactly the files of an uninterrupted one. When several processes or
    threads may write the same path at once (shared=True), each writes its own .NAME.PID-THREAD.tmp, so none
    renames another's half-written file into place. The temporary file is removed when write fails.
    """
    path = Path(path)
    if shared:
        temporary = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    else:
        temporary = path.with_name(f"{path.name}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, shared: bool = False) -> None:
    """Write data to path atomically (see atomic_write)."""
    atomic_write(path, lambda temporary: temporary.write_bytes(data), shared=shared)
