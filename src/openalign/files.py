"""Atomic file writes: a reader (or a resumed run) never sees half a file; a full disk is said in plain words."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from openalign.errors import OpenAlignError

# What the libraries say when the disk fills: torch.save to a file object chains the OSError (its own message
# is "unexpected pos" or "iostream error"), safetensors keeps only the operating system's text.
_FULL_DISK_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


class DiskFullError(OpenAlignError, OSError):
    """A write failed because the disk (or the user's quota) is full; the message names the file."""


def _says_disk_full(error: BaseException | None) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error) for text in _FULL_DISK_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def reporting_full_disk(path: str | os.PathLike) -> Iterator[None]:
    """Turn a write that failed for want of space into DiskFullError naming `path` and the space left; any other
    failure passes through. torch.save must be given an open file for its failure to carry the cause."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not _says_disk_full(error):
            raise
        folder = Path(path).parent
        try:
            free = f"{shutil.disk_usage(folder).free:,} bytes free on its file system"
        except OSError:
            free = "free space unknown"
        raise DiskFullError(f"no space left on device while writing {path} ({free})") from error


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
        with reporting_full_disk(path):
            write(temporary)
            os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, shared: bool = False) -> None:
    """Write data to path atomically (see atomic_write)."""
    atomic_write(path, lambda temporary: temporary.write_bytes(data), shared=shared)
