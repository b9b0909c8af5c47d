"""Image fingerprints read cheaply, for the data filters: size from the header, a content hash of the
bytes, and a perceptual hash for finding near-duplicates of evaluation images; read in a process pool.

A 64-bit DCT hash (pHash): the image is reduced to a 32 x 32 grey thumbnail, transformed with a 2-D DCT, and
each of the 8 x 8 lowest-frequency coefficients gives one bit: above or below their median. It needs no model
(an embedding model would have to be trained on the very data being cleaned), costs one thumbnail decode
(JPEGs decode at reduced scale through `draft`), and survives resizing, re-encoding and brightness changes:
on scikit-image's photos, resized / brightened / JPEG-50 copies lie 0-12 bits from their original and
distinct photos 20 or more apart, hence the default threshold of 10. It was preferred to the cheaper
difference hash, which on flat, noisy backgrounds hashes the noise. Limits: the hash is of luminance, so a
recoloured copy counts as a duplicate; mirrored, rotated or heavily cropped copies are missed.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from collections.abc import Iterable, Iterator

import numpy as np
from PIL import Image

from openalign.data.counting import stable_hash
from openalign.data.sources import DataError, Record, iter_records
from openalign.untrusted import MAX_IMAGE_BYTES, read_regular_file

PROBE_DTYPE = np.dtype([("width", "<i4"), ("height", "<i4"), ("image_hash", "<u8"), ("phash", "<u8"),
                        ("readable", "?")])

THUMBNAIL = 32
LOW_FREQUENCIES = 8


def _dct_matrix(size: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: D @ x is the DCT of a column vector x."""
    k = np.arange(size)
    matrix = np.sqrt(2.0 / size) * np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * size))
    matrix[0] /= np.sqrt(2.0)
    return matrix


_DCT = _dct_matrix(THUMBNAIL)


def phash(image: Image.Image) -> int:
    """The 64-bit DCT perceptual hash of a PIL image."""
    if image.format == "JPEG":
        image.draft("L", (THUMBNAIL * 2, THUMBNAIL * 2))  # decode at 1/2-1/8 scale: far cheaper
    grey = np.asarray(image.convert("L").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BOX),
                      dtype=np.float64)  # (32, 32)
    coefficients = (_DCT @ grey @ _DCT.T)[:LOW_FREQUENCIES, :LOW_FREQUENCIES].flatten()  # (64,)
    # The DC term (overall brightness) is left out of the median so a brightness shift moves no bit.
    bits = coefficients > np.median(coefficients[1:])
    return int(np.packbits(bits, bitorder="little").view("<u8")[0])


def phash_bytes(data: bytes) -> int:
    """The perceptual hash of an encoded image."""
    with Image.open(io.BytesIO(data)) as image:
        return phash(image)


def min_hamming_distances(hashes: np.ndarray, reference: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """For each hash, the smallest Hamming distance to any reference hash (64 when there is none).

    Brute force over (chunk x reference) XORs with a hardware popcount: about 10^9 comparisons a second,
    enough for evaluation sets of thousands of images."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    reference = np.asarray(reference, dtype=np.uint64)
    result = np.full(len(hashes), 64, dtype=np.int64)
    if len(reference) == 0:
        return result
    for start in range(0, len(hashes), chunk):
        block = hashes[start:start + chunk, None] ^ reference[None, :]  # (chunk, R)
        result[start:start + chunk] = np.bitwise_count(block).min(axis=1)
    return result


def probe_image(item: tuple[str | None, bytes | None, bool]) -> tuple[tuple, str]:
    """(width, height, content hash, perceptual hash, readable) of one image, from its header only unless
    the perceptual hash is wanted, and the error text when it cannot be read."""
    path, data, want_phash = item
    try:
        if data is None:
            if path is None or "://" in path:
                return (0, 0, 0, 0, False), f"no local image ({path})"
            data = read_regular_file(path, MAX_IMAGE_BYTES, "image")
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # parsed from the header; no pixel is decoded
            perceptual = phash(image) if want_phash else 0
        return (width, height, stable_hash(data), perceptual, True), ""
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # ValueError: a bound too
        return (0, 0, 0, 0, False), f"{type(error).__name__}: {error}"


def _probe_item(record: Record, want_phash: bool) -> tuple[str | None, bytes | None, bool]:
    if record.image_bytes is not None:
        return None, record.image_bytes, want_phash
    return (str(record.image_path) if record.image_path is not None else None), None, want_phash


class ImageProber:
    """Probes batches of records in a process pool (or in this process for one worker)."""

    def __init__(self, workers: int | None):
        self.workers = workers or os.cpu_count() or 1
        self.pool = None
        if self.workers > 1:
            self.pool = multiprocessing.get_context("fork").Pool(self.workers)

    def probe(self, records: list[Record], want_phash: bool) -> list[tuple[tuple, str]]:
        """`probe_image` of each record, in order."""
        items = [_probe_item(record, want_phash) for record in records]
        if self.pool is None:
            return [probe_image(item) for item in items]
        return self.pool.map(probe_image, items, chunksize=max(1, len(items) // (4 * self.workers)))

    def close(self) -> None:
        """Stop the worker processes."""
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def batches(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    """Consecutive lists of `size` records (the last may be shorter): the unit of work handed to the
    pool, which bounds memory whatever the corpus size."""
    batch = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def eval_image_hashes(source, workers: int | None = None) -> np.ndarray:
    """Perceptual hashes of the readable images of an evaluation set (folder, manifest or shard spec)."""
    prober, hashes = ImageProber(workers), []
    try:
        for batch in batches(iter_records(source), 1024):
            hashes += [facts[3] for facts, error in prober.probe(batch, True) if not error]
    finally:
        prober.close()
    if not hashes:
        raise DataError(f"evaluation image set {source} holds no readable image")
    return np.array(hashes, dtype=np.uint64)
