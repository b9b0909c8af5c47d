"""Where image-text pairs come from: manifests, WebDataset tar shards, image folders, and caption files
(captions without images, for embedding texts).

Every source is read as a stream of `Record`s (data/records.py). A record holds the undecoded image (a path or
raw bytes) and its caption, so readers stay cheap and decoding errors surface where they can be counted: in the
training dataset. Every read is bounded (openalign.untrusted): a shard member, caption or sidecar above its bound
is not read, and its record carries the reason in `error`, so the consumer skips and counts it; an image file
must be a regular file within the image bound. This module reads manifests, caption files and image folders and
dispatches a source to its reader; shards are data/shards.py's, and their names are importable from here too.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from openalign.data.records import IMAGE_EXTENSIONS, DataError, Record
from openalign.data.shards import (
    SHARD_SUFFIXES,
    Shard,
    count_shard_samples,
    expand_shards,
    is_shard_source,
    iter_shard,
    write_shards,
)
from openalign.errors import InputLimitError
from openalign.files import atomic_open, atomic_write
from openalign.untrusted import MAX_LINE_BYTES, MAX_TEXT_BYTES, parse_json, read_text_file

__all__ = ["CAPTION_COLUMNS", "IMAGE_COLUMNS", "IMAGE_EXTENSIONS", "MANIFEST_SUFFIXES", "SHARD_SUFFIXES", "DataError",
           "Record", "Shard", "check_source", "count_shard_samples", "expand_shards", "is_caption_file",
           "is_shard_source", "iter_caption_file", "iter_image_folder", "iter_manifest", "iter_records", "iter_shard",
           "write_manifest", "write_shards"]

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
CAPTION_FILE_SUFFIX = ".txt"
IMAGE_COLUMNS = ("image", "image_path", "path", "filepath", "file", "url", "img")
CAPTION_COLUMNS = ("caption", "text", "alt", "alt_text", "title")


# ------------------------------------------------------------------------------------------------------------
# Manifests


def _pick_column(columns: list[str], requested: str | None, candidates: tuple[str, ...], role: str,
                 path: Path) -> str:
    if requested is not None:
        if requested not in columns:
            raise DataError(f"manifest {path}: {role} column {requested!r} not found; columns are {columns}")
        return requested
    by_lower = {column.lower(): column for column in columns}
    for candidate in candidates:
        if candidate in by_lower:
            return by_lower[candidate]
    raise DataError(f"manifest {path}: no {role} column among {columns}; expected one of {list(candidates)} "
                    f"or pass {role}_column=")


def _text_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for each non-blank line of a UTF-8 text file, read as a stream; a line above
    MAX_LINE_BYTES or not UTF-8 is a DataError naming the file and line."""
    with open(path, "rb") as handle:
        for number in itertools.count(1):
            line = handle.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            if len(line) > MAX_LINE_BYTES:
                raise DataError(f"{what} {path}, line {number}: longer than the limit of {MAX_LINE_BYTES} bytes")
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{what} {path}, line {number}: not UTF-8 (byte {error.start}: {error.reason}); "
                                "re-save it as UTF-8") from None
            if text.strip():
                yield number, text


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each non-empty line of a JSON-lines manifest; a line that is not JSON or not an
    object is a DataError naming the file and line."""
    for number, text in _text_lines(path, "manifest"):
        where = f"manifest {path}, line {number}"
        try:
            row = parse_json(text, where)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: invalid JSON ({error})") from None
        except InputLimitError as error:
            raise DataError(str(error)) from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object of columns, found a {type(row).__name__}")
        yield number, row


def _csv_rows(path: Path, delimiter: str) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """Column names and rows of a CSV / TSV manifest; a line that is not UTF-8 or a malformed row is a DataError
    naming the file and line."""
    handle = open(path, "rb")  # closed by rows() below; lines decoded one by one, so an error knows its line

    def lines() -> Iterator[str]:
        for number, line in enumerate(handle, 1):
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"manifest {path}, line {number}: not UTF-8 (byte {error.start} of the line: "
                                f"{error.reason}); re-save it as UTF-8") from None

    reader = csv.DictReader(lines(), delimiter=delimiter)
    try:
        columns = list(reader.fieldnames or [])
    except csv.Error as error:
        handle.close()
        raise DataError(f"manifest {path}, line {reader.line_num}: {error}") from None
    except DataError:
        handle.close()
        raise

    def rows() -> Iterator[dict[str, Any]]:
        with handle:
            try:
                yield from reader
            except csv.Error as error:
                raise DataError(f"manifest {path}, line {reader.line_num}: {error}") from None

    return columns, rows()


def _read_rows(path: Path) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """Column names and an iterator of row dicts for a manifest file."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _csv_rows(path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".jsonl":
        # Two streaming passes (column names, then rows) so a manifest larger than memory still reads.
        columns = list(dict.fromkeys(key for _, row in _jsonl_rows(path) for key in row))
        return columns, (row for _, row in _jsonl_rows(path))
    if suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as parquet

        try:
            parquet_file = parquet.ParquetFile(path)
        except (pyarrow.ArrowException, OSError) as error:
            raise DataError(f"manifest {path} is not a readable Parquet file: {error}") from None

        def parquet_rows() -> Iterator[dict[str, Any]]:
            try:
                for batch in parquet_file.iter_batches(batch_size=4096):
                    yield from batch.to_pylist()
            except (pyarrow.ArrowException, OSError) as error:
                raise DataError(f"manifest {path} is corrupt: {error}") from None

        return list(parquet_file.schema_arrow.names), parquet_rows()
    raise DataError(f"manifest {path}: unknown format {suffix!r}; expected one of {list(MANIFEST_SUFFIXES)}")


def iter_manifest(path: str | Path, *, image_column: str | None = None,
                  caption_column: str | None = None) -> Iterator[Record]:
    """Read a CSV / TSV / JSONL / Parquet manifest of image paths and captions.

    Relative image paths are resolved against the manifest's folder; the other columns go to `Record.extra`.
    Column names are detected among common ones unless given.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist")
    columns, rows = _read_rows(path)
    if not columns:
        raise DataError(f"manifest {path} is empty: it holds no rows")
    image_key = _pick_column(columns, image_column, IMAGE_COLUMNS, "image", path)
    caption_key = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", path)
    for row in rows:
        written = row.get(image_key)
        if written is None or str(written) == "":
            raise DataError(f"manifest {path}: a row has an empty {image_key!r} column: {row}")
        written = str(written)
        caption = row.get(caption_key)
        extra = {key: value for key, value in row.items() if key not in (image_key, caption_key)}
        # URLs stay as written so the error at open time names them; local paths follow the manifest.
        image_path = Path(written) if "://" in written else (path.parent / written)
        yield Record(key=written, caption=None if caption is None else str(caption), image_path=image_path,
                     extra=extra)


# ------------------------------------------------------------------------------------------------------------
# Caption files, image folders and dispatch


def is_caption_file(source: str | Path) -> bool:
    """Whether source names a caption file: a .txt of one caption a line."""
    return str(source).lower().endswith(CAPTION_FILE_SUFFIX)


def iter_caption_file(path: str | Path) -> Iterator[Record]:
    """One record per non-blank line of a caption file, its caption the stripped line, its key "FILE:LINE"
    (the file as written, lines counted from 1), and no image."""
    if not Path(path).is_file():
        raise DataError(f"caption file {path} does not exist")
    for line_number, line in _text_lines(Path(path), "caption file"):
        yield Record(key=f"{path}:{line_number}", caption=line.strip())


def iter_image_folder(folder: str | Path) -> Iterator[Record]:
    """Images under a folder (recursively, sorted); the caption is a sidecar `<stem>.txt` if present."""
    folder = Path(folder)
    images = sorted(path for path in folder.rglob("*") if path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    for image_path in images:
        sidecar = image_path.with_suffix(".txt")
        caption, error = None, None
        if sidecar.is_file():
            try:
                caption = read_text_file(sidecar, MAX_TEXT_BYTES, "caption file").strip()
            except InputLimitError as limit_error:
                error = str(limit_error)
        yield Record(key=image_path.relative_to(folder).as_posix(), caption=caption, image_path=image_path,
                     image_ext=image_path.suffix.lower().lstrip("."), error=error)



def iter_records(source: str | Path | Shard | list) -> Iterator[Record]:
    """Stream the records of a manifest file, a shard spec, a folder of images, a caption file, or a list of
    these."""
    if isinstance(source, (list, tuple, Shard)):
        if is_shard_source(source):
            for shard in expand_shards(source):
                yield from iter_shard(shard)
        else:
            for item in source:
                yield from iter_records(item)
        return
    text = str(source)
    if is_caption_file(text):
        yield from iter_caption_file(text)
    elif is_shard_source(text):
        for shard in expand_shards(text):
            yield from iter_shard(shard)
    elif os.path.isdir(text):
        yield from iter_image_folder(text)
    elif text.lower().endswith(MANIFEST_SUFFIXES):
        yield from iter_manifest(text)
    elif not os.path.exists(text):
        raise DataError(f"data source {text} does not exist")
    else:
        raise DataError(f"data source {text}: not a manifest ({', '.join(MANIFEST_SUFFIXES)}), "
                        f"shard spec, folder or caption file ({CAPTION_FILE_SUFFIX})")


def check_source(source: str | Path | Shard | list) -> None:
    """Raise DataError naming the source when it names nothing that exists or holds no records: what a command
    checks before it creates its output, so that a mistyped or empty source leaves nothing behind. A source
    that runs a command (pipe:) is only expanded, not started: its command runs once, when it is read."""
    for item in source if isinstance(source, (list, tuple)) else [source]:
        if is_shard_source(item) and any(shard.command for shard in expand_shards(item)):
            continue
        records = iter_records(item)
        try:
            if next(records, None) is None:
                raise DataError(f"data source {item} is empty: it holds no image-text pairs or captions")
        finally:
            records.close()


def count_records(source: str | Path | Shard | list) -> int | None:
    """About how many records `iter_records(source)` yields (a progress bar's total), from what is cheap to read:
    manifest rows, non-blank caption lines, image file names, shard headers. None where counting means reading a
    stream twice (pipe: shards) or the source is not one iter_records knows."""
    if isinstance(source, (list, tuple, Shard)):
        if is_shard_source(source):
            return _count_shard_records(expand_shards(source))
        counts = [count_records(item) for item in source]
        return None if None in counts else sum(counts)
    text = str(source)
    if is_caption_file(text) and os.path.isfile(text):
        with open(text, encoding="utf-8", errors="replace") as handle:
            return sum(1 for line in handle if line.strip())
    if is_shard_source(text):
        return _count_shard_records(expand_shards(text))
    if os.path.isdir(text):
        return sum(1 for path in Path(text).rglob("*") if path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if text.lower().endswith(MANIFEST_SUFFIXES) and os.path.isfile(text):
        return sum(1 for _ in _read_rows(Path(text))[1])
    return None


def _count_shard_records(shards: list[Shard]) -> int | None:
    return None if any(shard.command for shard in shards) else sum(map(count_shard_samples, shards))


# ------------------------------------------------------------------------------------------------------------
# Writers


def _manifest_row(record: Record, manifest: Path, image_folder: Path, index: int) -> dict[str, Any]:
    if record.image_path is not None and "://" not in str(record.image_path):
        image = os.path.relpath(Path(record.image_path).absolute(), manifest.parent.absolute())
    elif record.image_path is not None:
        image = str(record.image_path)
    elif record.image_bytes is not None:
        # Shard records carry bytes only: give them files next to the manifest so its paths stay relative.
        image_folder.mkdir(parents=True, exist_ok=True)
        target = image_folder / f"{index:09d}.{record.image_ext or 'jpg'}"
        target.write_bytes(record.image_bytes)
        image = os.path.relpath(target, manifest.parent)
    else:
        raise DataError(f"record {record.key!r} has no image to write to manifest {manifest}")
    return {"image_path": Path(image).as_posix(), "caption": record.caption, **record.extra}


def write_manifest(records_or_rows: Iterable[Record | dict], path: str | Path) -> Path:
    """Write records (or plain row dicts) as a manifest; the format follows the suffix.

    Image paths are written relative to the manifest's folder. Records holding only bytes get their images
    written to `<manifest stem>_images/` beside it. The manifest is written under a temporary name and renamed
    into place, so a reader (or a rerun after a kill) finds the previous manifest or the whole new one. JSON
    lines are written as the records come, so memory does not grow with the manifest; CSV, TSV and Parquet
    gather the rows first (their columns come first).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise DataError(f"manifest {path}: unknown format {suffix!r}; expected one of "
                        f"{list(MANIFEST_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    image_folder = path.parent / f"{path.stem}_images"
    rows = (item if isinstance(item, dict) else _manifest_row(item, path, image_folder, index)
            for index, item in enumerate(records_or_rows))
    if suffix == ".jsonl":
        with atomic_open(path, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        return path
    rows = list(rows)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as parquet

        atomic_write(path, lambda temporary: parquet.write_table(pyarrow.Table.from_pylist(rows), temporary))
    else:
        with atomic_open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            for row in rows:
                # csv has no nested values: lists and dicts travel as JSON text.
                writer.writerow({key: json.dumps(value) if isinstance(value, (dict, list)) else value
                                 for key, value in row.items()})
    return path
