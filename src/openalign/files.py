"""Atomic file writes: a reader (or a resumed run) never sees half a file; a full disk is said in plain words;
an output folder written by one process at a time; a folder's record of its files (sizes and SHA-256),
which checkpoints, index folders and embedding parts keep."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from openalign.errors import OpenAlignError
from openalign.untrusted import refuse_links

# What the libraries say when the disk fills: torch.save to a file object chains the OSError (its own message
# is "unexpected pos" or "iostream error"), safetensors keeps only the operating system's text.
_FULL_DISK_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


class DiskFullError(OpenAlignError, OSError):
    """A write failed because the disk (or the user's quota) is full; the message names the file."""


class FolderInUseError(OpenAlignError):
    """Another process is writing into an output folder (it holds the folder's lock); the message names it."""


LOCK_NAME = ".lock"


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


def _temporary_name(path: Path, shared: bool) -> Path:
    if shared:
        return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    return path.with_name(f"{path.name}.tmp")


@contextlib.contextmanager
def _replacing(path: Path, temporary: Path) -> Iterator[None]:
    """Rename `temporary` onto `path` when the block ends without error; remove it when the block fails."""
    try:
        with reporting_full_disk(path):
            yield
            os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, shared: bool = False) -> None:
    """Call write(temporary) on a temporary file beside path, then rename it into place.

    The temporary file is NAME.tmp, a fixed name, so what a crashed run left behind is overwritten by the rerun
    and a resumed folder ends up with exactly the files of an uninterrupted one. When several processes or
    threads may write the same path at once (shared=True), each writes its own .NAME.PID-THREAD.tmp, so none
    renames another's half-written file into place. The temporary file is removed when write fails.
    """
    path = Path(path)
    temporary = _temporary_name(path, shared)
    with _replacing(path, temporary):
        write(temporary)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **options) -> Iterator[IO]:
    """A file written as a stream, atomically: open NAME.tmp beside `path` (`mode` and `options` as for open),
    and rename it into place when the block ends without error (atomic_write for what is written a piece at a
    time: a kill mid-stream leaves the previous file, never half of the new one)."""
    path = Path(path)
    temporary = _temporary_name(path, shared=False)
    with _replacing(path, temporary), open(temporary, mode, **options) as handle:
        yield handle


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, shared: bool = False) -> None:
    """Write data to path atomically (see atomic_write)."""
    atomic_write(path, lambda temporary: temporary.write_bytes(data), shared=shared)


@contextlib.contextmanager
def locked_folder(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold the lock of an output folder (created if need be) while writing into it: an exclusive fcntl lock on
    FOLDER/.lock, which the system releases when the process ends, however it ends. A second process that asks
    for it meanwhile fails at once with FolderInUseError naming the folder, instead of mixing its files with
    the first's."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    refuse_links(folder, [LOCK_NAME], what)
    descriptor = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUseError(f"{what} {folder} is being written by another process (it holds "
                                   f"{folder / LOCK_NAME}): wait for it to finish, or choose another folder") \
                from None
        yield folder
    finally:
        os.close(descriptor)


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
