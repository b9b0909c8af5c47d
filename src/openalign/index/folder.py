"""The index folder on disk, in one place: its files, index.json, files.json, and how a build replaces it.

A built folder holds index.faiss, metadata.arrow (row i describes vector i; Arrow IPC, memory-mapped on load),
index.json (the plan, the search settings the build tuned, the build's report), model.json (the model the
vectors came from, openalign.inference.model_record), files.json (the size and SHA-256 of every other file,
written last) and, for an "ivfpq" index, lists.ivfdata and vectors.npy. Folders written before metadata.arrow
existed hold metadata.parquet, which is still read; folders written before files.json are loaded unchecked.

A server maps these files. Rewriting one in place under it shows it other bytes than it loaded: wrong answers,
or a SIGBUS where a mapped page is gone. So no build ever writes into a built folder: it fills a hidden sibling
(.NAME.partial, the same for every process of a staged build) and publishes it by renaming it into place, in
one atomic exchange where the system has one (Linux's renameat2). A process that loaded the old folder keeps
its files (deleted, still mapped) and its answers; the next load sees the new folder whole.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from openalign.files import describe_files, files_problem, fsync_path, reporting_full_disk
from openalign.index.common import IndexBuildError, IndexPlan, import_faiss
from openalign.untrusted import MAX_TEXT_BYTES, parse_json, read_text_file

INDEX_FILE = "index.json"
FILES_FILE = "files.json"
FAISS_FILE = "index.faiss"
METADATA_FILE = "metadata.arrow"
LEGACY_METADATA_FILE = "metadata.parquet"
LISTS_FILE = "lists.ivfdata"
VECTORS_FILE = "vectors.npy"
MAX_INDEX_JSON_BYTES = MAX_TEXT_BYTES  # the plan, the tuning table and the build's report: a few KB


def building_folder(out_dir: str | os.PathLike) -> Path:
    """Where a build of out_dir is assembled: the hidden sibling .NAME.partial."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.partial"


def start_building(out_dir: str | os.PathLike) -> Path:
    """A fresh, empty building folder for out_dir (what an interrupted build left there is removed). Refuses an
    out_dir that exists and is not an index folder: publishing replaces the folder whole."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / INDEX_FILE).is_file())):
        raise IndexBuildError(f"{out_dir} exists and is not an index folder (no {INDEX_FILE}); a build replaces its "
                              "folder whole: choose another --out")
    work = building_folder(out_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def _write_json(path: Path, value: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with reporting_full_disk(path):
        temporary.write_text(json.dumps(value, indent=1))
        os.replace(temporary, path)


def write_index_json(folder: Path, plan: IndexPlan, embed_dir: Path, embed_kind: str, **extra) -> None:
    """index.json: the plan and where the vectors came from, plus any stage, tuning or report sections."""
    config = {"plan": asdict(plan), "dim": plan.dim, "embed_dir": str(embed_dir), "embed_kind": embed_kind, **extra}
    _write_json(Path(folder) / INDEX_FILE, config)


def read_index_json(folder: str | os.PathLike) -> dict:
    """The parsed index.json of a folder, its plan checked; IndexBuildError naming the file otherwise."""
    path = Path(folder) / INDEX_FILE
    try:
        config = parse_json(read_text_file(path, MAX_INDEX_JSON_BYTES, "index description"), str(path))
        IndexPlan.from_json(config["plan"])
    except (ValueError, KeyError, TypeError, OSError) as error:
        raise IndexBuildError(f"{path} is not an index description ({error})") from None
    return config


def update_index_json(folder: str | os.PathLike, **sections) -> dict:
    """Replace (or add) top-level sections of index.json (plan= an IndexPlan); returns the new contents."""
    config = read_index_json(folder)
    config.update({key: asdict(value) if isinstance(value, IndexPlan) else value for key, value in sections.items()})
    _write_json(Path(folder) / INDEX_FILE, config)
    return config


def read_metadata(index_dir: Path) -> pa.Table:
    """The metadata table of an index folder, memory-mapped when it is Arrow IPC (no copy in RAM)."""
    try:
        if (index_dir / METADATA_FILE).is_file():
            return pa.ipc.open_file(pa.memory_map(str(index_dir / METADATA_FILE))).read_all()
        if (index_dir / LEGACY_METADATA_FILE).is_file():
            return pq.read_table(index_dir / LEGACY_METADATA_FILE)
    except (pa.ArrowException, OSError) as error:
        raise IndexBuildError(f"{index_dir / METADATA_FILE} cannot be read ({error}); rebuild the index") from None
    raise IndexBuildError(f"{index_dir / METADATA_FILE} is missing: is {index_dir} an index folder?")


def write_faiss_index(index, path: Path) -> None:
    """faiss.write_index to a temporary name, renamed into place; a full disk is a DiskFullError naming path."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        with reporting_full_disk(path):
            import_faiss().write_index(index, str(temporary))
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def check_files(folder: str | os.PathLike, *, check_bytes: bool = False) -> None:
    """Compare the folder's files with files.json: sizes (a stat each, at every load), and with check_bytes
    every byte (SHA-256; `openalign index --verify`). IndexBuildError naming the folder and the file otherwise."""
    folder = Path(folder)
    listing_path = folder / FILES_FILE
    if not folder.is_dir():
        raise IndexBuildError(f"no index folder at {folder} (build one with `openalign index EMBED_DIR`)")
    if not listing_path.exists():
        if check_bytes:
            raise IndexBuildError(f"{listing_path} is missing: the folder was built before indexes recorded their "
                                  "files, or is not a finished index; rebuild it to verify it")
        return
    try:
        listing = parse_json(read_text_file(listing_path, MAX_INDEX_JSON_BYTES, "file record"), str(listing_path))
        sizes, digests = listing["sizes"], listing["sha256"]
    except (ValueError, KeyError, TypeError, OSError) as error:
        raise IndexBuildError(f"{listing_path} is unreadable ({error}); rebuild the index") from None
    problem = files_problem(folder, sizes, digests if check_bytes else None)
    if problem is not None:
        raise IndexBuildError(f"index {folder}: {problem}; the folder changed after it was built: rebuild it "
                              "with `openalign index`")


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    return result == 0


def publish(work: Path, out_dir: Path) -> None:
    """Record the building folder's files in files.json, then put it in out_dir's place (atomically where the
    system can) and remove what was there."""
    files = sorted(path for path in work.iterdir() if path.is_file() and path.name != FILES_FILE)
    with reporting_full_disk(work / FILES_FILE):
        (work / FILES_FILE).write_text(json.dumps(describe_files(work, files), indent=1) + "\n")
    for path in [*files, work / FILES_FILE, work]:
        fsync_path(path)
    if not out_dir.exists():
        os.replace(work, out_dir)
    elif _exchange(work, out_dir):
        shutil.rmtree(work)  # the old folder, now under the building name; mapped files live on while mapped
    else:
        # Two renames: between them out_dir is absent (a load then fails cleanly), never half written.
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(work, out_dir)
        shutil.rmtree(old)
    fsync_path(out_dir.parent)
