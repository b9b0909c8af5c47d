"""Bounds on bytes nobody vouched for: data files, shard members, sidecars, run folders.

Every read of such bytes goes through here, so that a 600 MB caption, `/dev/zero` named as an image, a FIFO that
never ends, or JSON nested a million levels deep costs a few bytes of reading and a typed error naming the file,
instead of all the memory, a hang or a RecursionError. Readers of samples turn the error into a counted skip.

The bounds are generous for real data (web images are rarely above 20 MB, alt-texts above a few KB) and are
module constants, so a project with other data can raise them in one place.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from openalign.errors import ConfigError, InputLimitError

MAX_IMAGE_BYTES = 64 * 2**20  # one encoded image file or shard member
MAX_TEXT_BYTES = 2**20  # one caption or JSON sidecar (a shard member, or a sidecar file beside an image)
MAX_LINE_BYTES = 4 * 2**20  # one line of a JSON-lines manifest
MAX_JSON_DEPTH = 64  # nesting of JSON objects and arrays in metadata


def read_regular_file(path: str | os.PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `max_bytes`; InputLimitError naming it otherwise.

    Opened without blocking and checked on the open descriptor, so a FIFO (which would wait for a writer forever),
    a device such as /dev/zero (which never ends) or a file swapped after a check is refused, not read.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise InputLimitError(f"{what} {path} cannot be opened: {error.strerror}") from None
    with os.fdopen(descriptor, "rb") as handle:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise InputLimitError(f"{what} {path} is not a regular file (a FIFO, device or folder is never read)")
        if status.st_size > max_bytes:
            raise InputLimitError(f"{what} {path} has {status.st_size} bytes, above the limit of {max_bytes}")
        # The size fstat gave in one read (a read of n bytes reserves n up front); more only if the file grew.
        chunks, total = [], 0
        while chunk := handle.read(min(max(status.st_size + 1, 2**16), max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise InputLimitError(f"{what} {path} has more than {max_bytes} bytes, the limit")
    return b"".join(chunks)


def is_regular_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a regular file (following symlinks); FIFOs and devices are not, and are never opened."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def read_text_file(path: str | os.PathLike, max_bytes: int = MAX_TEXT_BYTES, what: str = "text file") -> str:
    """A bounded regular file decoded as UTF-8; undecodable bytes are an InputLimitError naming the file and
    the byte offset."""
    data = read_regular_file(path, max_bytes, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputLimitError(f"{what} {path} is not UTF-8 text (byte {error.start}: {error.reason})") from None


def parse_json(text: str | bytes, what: str, max_depth: int = MAX_JSON_DEPTH, **decoder_options) -> Any:
    """json.loads with the nesting bounded: deeper than `max_depth` is an InputLimitError naming `what`.

    Invalid JSON raises json.JSONDecodeError (or UnicodeDecodeError for bytes) as usual; callers decide whether
    that skips a sample or stops with the file and line. decoder_options go to json.loads (e.g. parse_int to
    bound the digits of a number; what such a hook raises propagates).
    """
    try:
        value = json.loads(text, **decoder_options)
    except RecursionError:
        raise InputLimitError(f"{what}: JSON nested deeper than the interpreter's recursion limit") from None
    depth = json_depth(value)
    if depth > max_depth:
        raise InputLimitError(f"{what}: JSON nested {depth} levels deep, above the limit of {max_depth}")
    return value


def read_json_object(path: str | os.PathLike, max_bytes: int = MAX_TEXT_BYTES) -> dict:
    """A small JSON settings file of a model or tokenizer folder (tokenizer_config.json, preprocessor_config.json,
    config.json) as a dict: bounded in size and depth; anything else is a ConfigError naming the file."""
    try:
        value = parse_json(read_text_file(path, max_bytes, "JSON file"), str(path))
    except (InputLimitError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: cannot read JSON ({error})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} must hold a JSON object, found a {type(value).__name__}")
    return value


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, [] is 1), walked without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((child, depth) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def confined_path(folder: str | os.PathLike, name: str, what: str) -> Path:
    """`folder / name` for a file name read from a file inside `folder`, refused unless it stays inside it: no
    absolute path, no `..`, no symlink leading out."""
    folder = Path(folder)
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise InputLimitError(f"{what} names {name!r}, which is not a file inside {folder}")
    path = folder / relative
    if not path.resolve().is_relative_to(folder.resolve()):
        raise InputLimitError(f"{what} names {name!r}, which leads outside {folder}")
    return path


def refuse_links(folder: str | os.PathLike, names: Iterable[str], what: str) -> None:
    """Raise InputLimitError naming the first of `names` in `folder` that is a symbolic link. A folder received
    from someone else may link an entry it holds to a file or folder elsewhere, which writing, emptying or
    replacing that entry in place would change; a command that writes into such a folder checks first."""
    folder = Path(folder)
    for name in names:
        path = folder / name
        if path.is_symlink():
            raise InputLimitError(f"{what} {folder}: {name} is a symbolic link (to {os.readlink(path)}), and "
                                  "writing it would change what it points to: replace the link with a copy of "
                                  "what it points to, or use another folder")
