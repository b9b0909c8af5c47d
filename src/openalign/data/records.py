"""The unit every data source yields: a `Record` (one image-text pair as stored, before decoding), and the error
a source that cannot be read raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openalign.errors import InputLimitError, OpenAlignError
from openalign.untrusted import MAX_IMAGE_BYTES, read_regular_file

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


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
