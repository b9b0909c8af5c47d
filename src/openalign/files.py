"""Atomic file writes: a reader (or a resumed run) never sees half a file; a full disk is said in plain words; a
folder's record of its files (sizes and SHA-256), which checkpoints, index folders and embedding parts keep."""

from __future__ import annotations

import contextlib
import errno
import hashlib
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


def allocate_file(path: str | os.PathLike, size: int) -> None:
    """Create `path` with `size` bytes whose blocks are reserved on disk, so that filling it later through a memory
    map cannot fail (a write to a sparse map on a full disk is a SIGBUS that kills the process without a word).
    A full disk is a DiskFullError naming the file; a file system without fallocate gets the zeros written."""
    with reporting_full_disk(path), open(path, "wb") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.ENODEV):
                raise
            block = bytes(2**20)
            for start in range(0, size, len(block)):
                handle.write(block[: min(len(block), size - start)])


def reserve_space(path: str | os.PathLike, size: int) -> None:
    """Raise DiskFullError naming `path` unless `size` bytes can be allocated beside it now (a file is reserved
    there, then removed): for writers that grow a file through a memory map themselves (FAISS's on-disk lists)."""
    path = Path(path)
    probe = path.with_name(f".{path.name}.reserve-{os.getpid()}")
    try:
        allocate_file(probe, size)
    except DiskFullError as error:
        raise DiskFullError(f"no space left on device for {path}: it needs {size:,} bytes, "
                            f"{shutil.disk_usage(path.parent).free:,} are free") from error.__cause__
    finally:
        probe.unlink(missing_ok=True)


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(folder: str | os.PathLike, paths) -> dict[str, dict[str, int | str]]:
    """{"sizes": {name: bytes}, "sha256": {name: hex}} of `paths`, named relative to `folder` (POSIX form): the
    record a folder keeps of its files, checked by `files_problem`."""
    folder = Path(folder)
    names = {Path(path).relative_to(folder).as_posix(): Path(path) for path in paths}
    return {"sizes": {name: path.stat().st_size for name, path in names.items()},
            "sha256": {name: file_digest(path) for name, path in names.items()}}


def files_problem(folder: str | os.PathLike, sizes: dict, digests: dict | None = None) -> str | None:
    """How the files of `folder` differ from their record, first difference only, or None when they match: a
    file missing, of another size (truncated or replaced), or, when `digests` are given, of other bytes. Sizes
    cost a stat; digests a read of every byte, so callers check sizes at every load and digests when asked."""
    folder = Path(folder)
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if size is not None and path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written (truncated or replaced)"
    for name, digest in (digests or {}).items():
        if name in sizes and file_digest(folder / name) != digest:
            return f"{name} does not match the SHA-256 written with it (its bytes changed since: a bad disk or copy)"
    return None


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file or folder to disk, so a rename never lands before the data it names (ignored where the
    platform cannot open folders)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
