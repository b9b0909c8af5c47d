"""WebDataset tar shards: shard specs (brace patterns, globs, folders, `pipe:` commands), the streaming reader,
the header count and the writer.

A spec expands to `Shard`s, each either a local file or a command the user wrote: only a spec that starts with
`pipe:` names commands. A name that a folder listing, a glob or a brace range finds is a file, whatever it reads
like, so a file called `pipe:sh -c '...' x.tar` in a data folder is opened, never run. Everything after the
expansion takes the typed `Shard` (a plain string or path is a file), so nothing downstream can re-read a file
name as a command.

Members are read bounded (openalign.untrusted): a member above its bound is passed over unread and its sample's
record carries the reason in `error`, so the consumer skips and counts it; a `.json` sidecar nested too deep
likewise. Gzipped shards are decompressed by gzip.GzipFile, a block at a time.
"""

from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openalign.data.records import IMAGE_EXTENSIONS, DataError, Record
from openalign.errors import InputLimitError
from openalign.files import atomic_open
from openalign.untrusted import MAX_IMAGE_BYTES, MAX_TEXT_BYTES, parse_json

logger = logging.getLogger(__name__)

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
COMMAND_PREFIX = "pipe:"


@dataclass(frozen=True)
class Shard:
    """One shard to read: a local tar file, or (`command` true) a command whose standard output is the tar.

    Only `expand_shards` makes command shards, and only from a spec the user wrote starting with `pipe:`.
    """

    location: str  # the file's path, or the command line without its "pipe:"
    command: bool = False

    def __str__(self) -> str:
        """The spec this shard reads as: "pipe:COMMAND" for a command; for a file its path, with "./" before a
        relative name that starts with "pipe:" so that the text, if ever read back as a spec, is still a file."""
        if self.command:
            return COMMAND_PREFIX + self.location
        return os.path.join(".", self.location) if self.location.startswith(COMMAND_PREFIX) else self.location


def as_shard(shard: Shard | str | os.PathLike) -> Shard:
    """A Shard as is; a plain string or path is a local file (never a command: see `expand_shards`)."""
    return shard if isinstance(shard, Shard) else Shard(os.fspath(shard))


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
    return text.startswith(COMMAND_PREFIX) or text.endswith(SHARD_SUFFIXES)


def expand_shards(spec: str | Path | Shard | list) -> list[Shard]:
    """Turn a shard spec into the shards it names.

    Accepts brace patterns ("data/{00000..00009}.tar"), globs, a folder of tars, "pipe:cmd" URLs (commands,
    braces expanded), Shards (kept), or a list of any of these. Local names that match nothing raise DataError.
    Only a spec that starts with "pipe:" gives commands: what a folder listing or a glob finds is a file.
    """
    if isinstance(spec, (list, tuple)):
        return [shard for item in spec for shard in expand_shards(item)]
    if isinstance(spec, Shard):
        return [spec]
    text = str(spec)
    if text.startswith(COMMAND_PREFIX):
        return [Shard(command[len(COMMAND_PREFIX):], command=True) for command in _expand_braces(text)]
    if os.path.isdir(text):
        paths = sorted(str(path) for suffix in SHARD_SUFFIXES for path in Path(text).glob(f"*{suffix}"))
        if not paths:
            raise DataError(f"shard folder {text} holds no {'/'.join(SHARD_SUFFIXES)} files")
        return [Shard(path) for path in paths]
    shards = []
    for pattern in _expand_braces(text):
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise DataError(f"shard pattern {pattern!r} (from {text!r}) matches no files")
            shards.extend(Shard(match) for match in matches)
        elif os.path.exists(pattern):
            shards.append(Shard(pattern))
        else:
            raise DataError(f"shard {pattern!r} (from {text!r}) does not exist")
    return shards


def is_shard_source(source: str | Path | Shard | list) -> bool:
    """Whether `source` names WebDataset shards (a tar, pattern, pipe:, a folder of tars, or Shards)."""
    if isinstance(source, (list, tuple)):
        return bool(source) and all(is_shard_source(item) for item in source)
    if isinstance(source, Shard):
        return True
    text = str(source)
    if _is_shard_path(text) or "{" in text:
        return True
    if os.path.isdir(text):
        return any(any(Path(text).glob(f"*{suffix}")) for suffix in SHARD_SUFFIXES)
    return glob.has_magic(text)


# ------------------------------------------------------------------------------------------------------------
# Reading


def _split_member_name(name: str) -> tuple[str, str]:
    """("dir/000123.jpg") -> ("dir/000123", "jpg"): the key ends at the first dot of the basename."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _shard_stem(shard: Shard) -> str:
    name = shard.location.split()[-1] if shard.command else shard.location
    base = os.path.basename(name.rstrip("/"))
    for suffix in SHARD_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


# Members a sample is made of, and the most bytes each may have; others are passed over unread.
MEMBER_LIMITS = {**{extension: MAX_IMAGE_BYTES for extension in IMAGE_EXTENSIONS},
                 "txt": MAX_TEXT_BYTES, "json": MAX_TEXT_BYTES}


def _record_from_members(shard: Shard, key: str, members: dict[str, bytes], error: str | None = None) -> Record:
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


def iter_shard(shard: Shard | str | os.PathLike) -> Iterator[Record]:
    """Stream the samples of one WebDataset tar: a Shard from `expand_shards` (a file, or a command that
    writes the tar), or a plain path, which is always a file.

    Members sharing a key (basename before its first dot) form one sample; WebDataset writes them adjacently.
    The caption comes from `.txt`, else from the `.json` sidecar's "caption" or "text". A tar that cannot be
    read raises DataError naming it, after the samples read so far have been yielded.
    """
    shard = as_shard(shard)
    process = None
    current_key, members, oversized = None, {}, None
    try:
        if shard.command:
            process = subprocess.Popen(shlex.split(shard.location), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            raw = process.stdout
        else:
            raw = open(shard.location, "rb")
        with raw, _open_tar_stream(raw) as stream:
            for member in stream:
                if not member.isfile():
                    continue
                key, extension = _split_member_name(member.name)
                if key != current_key:
                    if current_key is not None:
                        yield _record_from_members(shard, current_key, members, oversized)
                    current_key, members, oversized = key, {}, None
                limit = MEMBER_LIMITS.get(extension)
                if limit is None:
                    continue  # not part of an image-text sample: never read
                if member.size > limit:
                    oversized = oversized or (f"shard {shard}, sample {key}: member {member.name} has {member.size} "
                                              f"bytes, above the limit of {limit} for .{extension}")
                    continue  # left unread: the stream skips it block by block
                handle = stream.extractfile(member)
                members[extension] = handle.read() if handle is not None else b""  # member.size bytes at most
            # tarfile ends quietly at a short or missing header; a complete tar ends with a full zero block.
            if stream.fileobj.pos - stream.offset < tarfile.BLOCKSIZE:
                raise tarfile.ReadError("archive ends without its end-of-archive blocks")
    except (OSError, tarfile.TarError, EOFError, zlib.error) as error:
        if process is None or process.poll() in (None, 0):
            raise DataError(f"shard {shard} is truncated or corrupt after sample {current_key!r}: {error}") \
                from error
    finally:
        if process is not None:
            process.stdout.close()
            stderr = process.stderr.read(MAX_TEXT_BYTES).decode("utf-8", errors="replace").strip()
            process.stderr.close()
            returncode = process.wait()
    if process is not None and returncode != 0:
        raise DataError(f"shard {shard}: command exited with status {returncode}: {stderr}")
    if current_key is not None:
        yield _record_from_members(shard, current_key, members, oversized)


def count_shard_samples(shard: Shard | str | os.PathLike) -> int:
    """Number of samples (distinct keys) in a local tar, read from its headers without reading images."""
    shard = as_shard(shard)
    if shard.command:
        raise DataError(f"shard {shard}: the samples of a command's output cannot be counted without running it")
    try:
        with tarfile.open(shard.location, mode="r:*") as archive:
            return len({_split_member_name(member.name)[0] for member in archive if member.isfile()})
    except (OSError, tarfile.TarError, EOFError) as error:
        raise DataError(f"shard {shard} cannot be read: {error}") from error


# ------------------------------------------------------------------------------------------------------------
# Writing


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: identical inputs, identical tars
    archive.addfile(info, io.BytesIO(data))


def write_shards(records: Iterable[Record], out_dir: str | Path, *, samples_per_shard: int = 1000,
                 prefix: str = "shard") -> list[Path]:
    """Write records as WebDataset tars in the img2dataset layout: `<key>.<ext>`, `<key>.txt`, `<key>.json`.

    Sample keys are running numbers; the `.json` sidecar keeps the record's original key and extra fields.
    Each tar is written under a temporary name and renamed into place when whole, so a kill never leaves half
    a shard under a shard's name. Returns the shard paths, named `<prefix>-00000.tar`, ...
    """
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    numbered = enumerate(records)
    while first := next(numbered, None):
        path = out_dir / f"{prefix}-{len(shards):05d}.tar"
        with atomic_open(path, "wb") as handle, \
                tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for index, record in itertools.chain([first], itertools.islice(numbered, samples_per_shard - 1)):
                _add_sample(archive, f"{index:09d}", record)
        shards.append(path)
    return shards


def _add_sample(archive: tarfile.TarFile, key: str, record: Record) -> None:
    extension = record.image_ext or (Path(record.image_path).suffix.lstrip(".").lower()
                                     if record.image_path is not None else "jpg")
    _add_member(archive, f"{key}.{extension}", record.open_image_bytes())
    if record.caption is not None:
        _add_member(archive, f"{key}.txt", record.caption.encode("utf-8"))
    sidecar = {"key": record.key, "caption": record.caption, **record.extra}
    _add_member(archive, f"{key}.json", json.dumps(sidecar, ensure_ascii=False).encode("utf-8"))
