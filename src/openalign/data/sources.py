"""Where image-text pairs come from: manifests, WebDataset tar shards, image folders, and caption files
(captions without images, for embedding texts).

Every source is read as a stream of `Record`s. A record holds the undecoded image (a path or raw bytes) and
its caption, so readers stay cheap and decoding errors surface where they can be counted: in the training
dataset. Every read is bounded (openalign.untrusted): a shard member, caption or sidecar above its bound is not
read, and its record carries the reason in `error`, so the consumer skips and counts it; an image file must be
a regular file within the image bound.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import itertools
import json
import logging
import os
import re
import shlex
import subprocess
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openalign.errors import InputLimitError, OpenAlignError
from openalign.untrusted import (
    MAX_IMAGE_BYTES,
    MAX_LINE_BYTES,
    MAX_TEXT_BYTES,
    parse_json,
    read_regular_file,
    read_text_file,
)

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
CAPTION_FILE_SUFFIX = ".txt"
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
IMAGE_COLUMNS = ("image", "image_path", "path", "filepath", "file", "url", "img")
CAPTION_COLUMNS = ("caption", "text", "alt", "alt_text", "title")


class DataError(OpenAlignError, ValueError):
    """A data source cannot be read or does not have the expected layout; the message names it."""


@dataclass
class Record:
    """One image-text pair as stored, before decoding.

    `key` is stable across runs: the manifest's path as written, "<shard stem>/<sample key>" for shards, or
    "FILE:LINE" for a line of a caption file (a record with a caption and no image).
    `error` says why the sample cannot be used when the reader found out without decoding (a member above its
    size bound, a sidecar nested too deep); consumers skip such a record and count it.
    """

    key: str
    caption: str | None
    image_path: Path | None = None
    image_bytes: bytes | None = None
    image_ext: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def open_image_bytes(self) -> bytes:
        """Return the encoded image, reading `image_path` when the record holds no bytes: a regular file of at
        most MAX_IMAGE_BYTES, else InputLimitError naming it."""
        if self.error is not None:
            raise InputLimitError(self.error)
        if self.image_bytes is not None:
            return self.image_bytes
        if self.image_path is None:
            raise DataError(f"record {self.key!r} has no image (no path and no bytes)")
        if "://" in str(self.image_path):
            raise DataError(f"record {self.key!r}: remote image {self.image_path} is not downloaded here; "
                            "fetch the images first (e.g. with img2dataset) and train from the shards")
        return read_regular_file(self.image_path, MAX_IMAGE_BYTES, f"image of record {self.key!r}:")


# ------------------------------------------------------------------------------------------------------------
# Shard specs


_BRACE = re.compile(r"\{([^{}]*)\}")


def _expand_braces(pattern: str) -> list[str]:
    """Expand the first brace group ("{000..009}" or "{a,b}") recursively; ranges keep their zero padding."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        first, last = range_match.groups()
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(number).zfill(width) for number in range(int(first), int(last) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        raise DataError(f"cannot expand brace group {{{body}}} in shard pattern {pattern!r}")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [expanded for option in options for expanded in _expand_braces(head + option + tail)]


def _is_shard_path(text: str) -> bool:
    return text.startswith("pipe:") or text.endswith(SHARD_SUFFIXES)


def expand_shards(spec: str | Path | list) -> list[str]:
    """Turn a shard spec into a list of shard URLs.

    Accepts brace patterns ("data/{00000..00009}.tar"), globs, a folder of tars, "pipe:cmd" URLs (kept as
    written, braces expanded), or a list of any of these. Local names that match nothing raise DataError.
    """
    if isinstance(spec, (list, tuple)):
        return [url for item in spec for url in expand_shards(item)]
    text = str(spec)
    if text.startswith("pipe:"):
        return _expand_braces(text)
    if os.path.isdir(text):
        urls = sorted(str(path) for suffix in SHARD_SUFFIXES for path in Path(text).glob(f"*{suffix}"))
        if not urls:
            raise DataError(f"shard folder {text} holds no {'/'.join(SHARD_SUFFIXES)} files")
        return urls
    urls = []
    for pattern in _expand_braces(text):
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise DataError(f"shard pattern {pattern!r} (from {text!r}) matches no files")
            urls.extend(matches)
        elif os.path.exists(pattern):
            urls.append(pattern)
        else:
            raise DataError(f"shard {pattern!r} (from {text!r}) does not exist")
    return urls


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
# Shards


def _split_member_name(name: str) -> tuple[str, str]:
    """("dir/000123.jpg") -> ("dir/000123", "jpg"): the key ends at the first dot of the basename."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _shard_stem(url: str) -> str:
    name = url.split()[-1] if url.startswith("pipe:") else url
    base = os.path.basename(name.rstrip("/"))
    for suffix in SHARD_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


# Members a sample is made of, and the most bytes each may have; others are passed over unread.
MEMBER_LIMITS = {**{extension: MAX_IMAGE_BYTES for extension in IMAGE_EXTENSIONS},
                 "txt": MAX_TEXT_BYTES, "json": MAX_TEXT_BYTES}


def _record_from_members(shard: str, key: str, members: dict[str, bytes], error: str | None = None) -> Record:
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    where = f"shard {shard}, sample {key}"
    extra: dict[str, Any] = {}
    if "json" in members:
        try:
            extra = parse_json(members["json"].decode("utf-8"), f"{where}: .json sidecar")
        except (UnicodeDecodeError, json.JSONDecodeError) as decode_error:
            logger.warning("%s: unreadable .json sidecar (%s)", where, decode_error)
        except InputLimitError as limit_error:
            error = error or str(limit_error)
        if not isinstance(extra, dict):
            extra = {"json": extra}
    caption = None
    if "txt" in members:
        caption = members["txt"].decode("utf-8", errors="replace").strip()
    elif extra.get("caption") is not None or extra.get("text") is not None:
        caption = str(extra.get("caption") if extra.get("caption") is not None else extra["text"])
    return Record(key=f"{_shard_stem(shard)}/{key}", caption=caption,
                  image_bytes=members.get(image_ext) if image_ext else None, image_ext=image_ext, extra=extra,
                  error=error)


def _open_tar_stream(raw: io.BufferedReader) -> tarfile.TarFile:
    """A streaming TarFile over `raw`, gunzipped by gzip.GzipFile when the bytes are gzipped. tarfile's own
    stream decompresses whole chunks whatever their expansion and copies its buffer at every block, so passing
    over a 600 MB member of zeros took minutes; GzipFile decompresses only what is read."""
    if raw.peek(2)[:2] == b"\x1f\x8b":
        return tarfile.open(fileobj=gzip.GzipFile(fileobj=raw, mode="rb"), mode="r|")
    return tarfile.open(fileobj=raw, mode="r|*")


def iter_shard(url: str) -> Iterator[Record]:
    """Stream the samples of one WebDataset tar (local path or "pipe:command").

    Members sharing a key (basename before its first dot) form one sample; WebDataset writes them adjacently.
    The caption comes from `.txt`, else from the `.json` sidecar's "caption" or "text". A tar that cannot be
    read raises DataError naming it, after the samples read so far have been yielded.
    """
    process = None
    current_key, members, oversized = None, {}, None
    try:
        if url.startswith("pipe:"):
            command = url[len("pipe:"):]
            process = subprocess.Popen(shlex.split(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            raw = process.stdout
        else:
            raw = open(url, "rb")
        with raw, _open_tar_stream(raw) as stream:
            for member in stream:
                if not member.isfile():
                    continue
                key, extension = _split_member_name(member.name)
                if key != current_key:
                    if current_key is not None:
                        yield _record_from_members(url, current_key, members, oversized)
                    current_key, members, oversized = key, {}, None
                limit = MEMBER_LIMITS.get(extension)
                if limit is None:
                    continue  # not part of an image-text sample: never read
                if member.size > limit:
                    oversized = oversized or (f"shard {url}, sample {key}: member {member.name} has {member.size} "
                                              f"bytes, above the limit of {limit} for .{extension}")
                    continue  # left unread: the stream skips it block by block
                handle = stream.extractfile(member)
                members[extension] = handle.read() if handle is not None else b""  # member.size bytes at most
            # tarfile ends quietly at a short or missing header; a complete tar ends with a full zero block.
            if stream.fileobj.pos - stream.offset < tarfile.BLOCKSIZE:
                raise tarfile.ReadError("archive ends without its end-of-archive blocks")
    except (OSError, tarfile.TarError, EOFError, zlib.error) as error:
        if process is None or process.poll() in (None, 0):
            raise DataError(f"shard {url} is truncated or corrupt after sample {current_key!r}: {error}") \
                from error
    finally:
        if process is not None:
            process.stdout.close()
            stderr = process.stderr.read(MAX_TEXT_BYTES).decode("utf-8", errors="replace").strip()
            process.stderr.close()
            returncode = process.wait()
    if process is not None and returncode != 0:
        raise DataError(f"shard {url}: command exited with status {returncode}: {stderr}")
    if current_key is not None:
        yield _record_from_members(url, current_key, members, oversized)


def count_shard_samples(url: str) -> int:
    """Number of samples (distinct keys) in a local tar, read from its headers without reading images."""
    try:
        with tarfile.open(url, mode="r:*") as archive:
            return len({_split_member_name(member.name)[0] for member in archive if member.isfile()})
    except (OSError, tarfile.TarError, EOFError) as error:
        raise DataError(f"shard {url} cannot be read: {error}") from error


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


def is_shard_source(source: str | Path | list) -> bool:
    """Whether `source` names WebDataset shards (a tar, pattern, pipe:, or a folder of tars)."""
    if isinstance(source, (list, tuple)):
        return bool(source) and all(is_shard_source(item) for item in source)
    text = str(source)
    if _is_shard_path(text) or "{" in text:
        return True
    if os.path.isdir(text):
        return any(any(Path(text).glob(f"*{suffix}")) for suffix in SHARD_SUFFIXES)
    return glob.has_magic(text)


def iter_records(source: str | Path | list) -> Iterator[Record]:
    """Stream the records of a manifest file, a shard spec, a folder of images, a caption file, or a list of
    these."""
    if isinstance(source, (list, tuple)):
        if is_shard_source(source):
            for url in expand_shards(list(source)):
                yield from iter_shard(url)
        else:
            for item in source:
                yield from iter_records(item)
        return
    text = str(source)
    if is_caption_file(text):
        yield from iter_caption_file(text)
    elif is_shard_source(text):
        for url in expand_shards(text):
            yield from iter_shard(url)
    elif os.path.isdir(text):
        yield from iter_image_folder(text)
    elif text.lower().endswith(MANIFEST_SUFFIXES):
        yield from iter_manifest(text)
    elif not os.path.exists(text):
        raise DataError(f"data source {text} does not exist")
    else:
        raise DataError(f"data source {text}: not a manifest ({', '.join(MANIFEST_SUFFIXES)}), "
                        f"shard spec, folder or caption file ({CAPTION_FILE_SUFFIX})")


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
    written to `<manifest stem>_images/` beside it. JSON lines are written as the records come, so memory
    does not grow with the manifest; CSV, TSV and Parquet gather the rows first (their columns come first).
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
        with open(path, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        return path
    rows = list(rows)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as parquet

        parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    else:
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            for row in rows:
                # csv has no nested values: lists and dicts travel as JSON text.
                writer.writerow({key: json.dumps(value) if isinstance(value, (dict, list)) else value
                                 for key, value in row.items()})
    return path


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: identical inputs, identical tars
    archive.addfile(info, io.BytesIO(data))


def write_shards(records: Iterable[Record], out_dir: str | Path, *, samples_per_shard: int = 1000,
                 prefix: str = "shard") -> list[Path]:
    """Write records as WebDataset tars in the img2dataset layout: `<key>.<ext>`, `<key>.txt`, `<key>.json`.

    Sample keys are running numbers; the `.json` sidecar keeps the record's original key and extra fields.
    Returns the shard paths, named `<prefix>-00000.tar`, ...
    """
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    archive = None
    try:
        for index, record in enumerate(records):
            if index % samples_per_shard == 0:
                if archive is not None:
                    archive.close()
                shards.append(out_dir / f"{prefix}-{len(shards):05d}.tar")
                archive = tarfile.open(shards[-1], "w", format=tarfile.USTAR_FORMAT)
            key = f"{index:09d}"
            extension = record.image_ext or (Path(record.image_path).suffix.lstrip(".").lower()
                                             if record.image_path is not None else "jpg")
            _add_member(archive, f"{key}.{extension}", record.open_image_bytes())
            if record.caption is not None:
                _add_member(archive, f"{key}.txt", record.caption.encode("utf-8"))
            sidecar = {"key": record.key, "caption": record.caption, **record.extra}
            _add_member(archive, f"{key}.json", json.dumps(sidecar, ensure_ascii=False).encode("utf-8"))
    finally:
        if archive is not None:
            archive.close()
    return shards
