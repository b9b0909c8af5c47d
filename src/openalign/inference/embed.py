"""Embedding at scale: stream items through an encoder into an embedding folder of fixed-size parts.

The folder's layout, its resume after a crash and its sharding over ranks are openalign.inference.embedding_folder's;
this module loads each part's items (images decoded on a thread pool, captions), encodes them a batch at a time,
L2-normalises and hands the part over as float16. Only one part's embeddings and one batch of raw items are ever
held in memory.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from openalign.errors import ImageLoadError, OpenAlignError
from openalign.inference.embedding_folder import (
    KINDS,
    EmbeddingFolderError,
    NonFiniteEmbeddingError,
    first_non_finite,
    iter_embedding_parts,
    read_embedding_folder,
    read_summary,
    write_parts,
    write_summary,
)
from openalign.processing.tokenizer import is_unicode_text

# The folder's readers and summary writer, under the names callers have imported from here.
__all__ = ["EmbeddingFolderError", "MissingCaptionError", "NonFiniteEmbeddingError", "embed_to_folder",
           "iter_embedding_parts", "load_image", "read_embedding_folder", "read_summary", "write_summary"]


class MissingCaptionError(OpenAlignError, ValueError):
    """An item has no caption text while texts are being embedded; the item is skipped and listed."""


def _describe(item, kinds=("image",)) -> dict:
    """Normalise an item to {source, caption, image}.

    A plain string is the caption when only texts are embedded and an image path otherwise; a mapping names
    its fields ("source" or "key", "caption" or "text", "image"); a data-source Record gives its path or key,
    caption and bytes.
    """
    if isinstance(item, Mapping):
        source = item.get("source", item.get("key"))
        return {
            "source": None if source is None else str(source),
            "caption": item.get("caption", item.get("text")),
            "image": item.get("image"),
        }
    if hasattr(item, "key") and hasattr(item, "image_bytes"):
        # A openalign.data.sources.Record (manifest, WebDataset shard or image folder), matched by shape so
        # this module does not import the data package.
        path = getattr(item, "image_path", None)
        return {
            "source": str(path) if path is not None else item.key,
            "caption": item.caption,
            "image": item.image_bytes,
        }
    if isinstance(item, str) and tuple(kinds) == ("text",):
        return {"source": None, "caption": item, "image": None}
    if isinstance(item, (str, os.PathLike)):
        return {"source": str(item), "caption": None, "image": None}
    raise EmbeddingFolderError(f"item {item!r} is neither a path nor a mapping with source / caption / image")


def load_image(source, image=None):
    """RGB PIL image of an item: its in-memory image (bytes or PIL) when it has one, else the file at source.

    Goes through openalign.processing.images.load_image (mode conversion, EXIF orientation, size limit);
    raises ImageLoadError naming the source.
    """
    from openalign.processing.images import load_image as load_any_image

    return load_any_image(image if image is not None else source, name=str(source))


def _load(kinds, item, index, image_loader):
    """Metadata row plus the payload for each kind; ImageLoadError / missing captions propagate to the caller."""
    described = _describe(item, kinds)
    if getattr(item, "error", None):  # a data-source Record its reader found unusable (a member over its bound)
        raise ImageLoadError(item.error)
    row = {"index": index, "source": described["source"], "caption": described["caption"]}
    row["width"] = row["height"] = None
    payloads = {}
    if "text" in kinds:
        if not is_unicode_text(described["caption"]):
            raise MissingCaptionError(f"item {index} ({described['source']}) has no caption text to embed "
                                      "(missing, or not valid Unicode)")
        payloads["text"] = described["caption"]
    if "image" in kinds:
        image = image_loader(described["source"], described["image"])
        row["width"], row["height"] = image.size
        payloads["image"] = image
    return row, payloads


def _encode(encoder, payloads) -> np.ndarray:
    """Encode one batch, L2-normalise in float32, return float16 (B, D)."""
    with torch.no_grad():
        embeddings = encoder(payloads)
    embeddings = torch.as_tensor(embeddings).detach().float().cpu()
    if embeddings.ndim != 2 or embeddings.shape[0] != len(payloads):
        raise EmbeddingFolderError(
            f"encoder returned shape {tuple(embeddings.shape)} for a batch of {len(payloads)} items"
        )
    return torch.nn.functional.normalize(embeddings, dim=-1).numpy().astype(np.float16)


def _load_or_skip(kinds, item, index, image_loader):
    """(row, payloads) for an item that loads, or (None, skipped-entry) for one that does not."""
    try:
        return _load(kinds, item, index, image_loader)
    except (ImageLoadError, MissingCaptionError) as error:
        return None, {"index": index, "source": _describe(item, kinds)["source"], "error": str(error)}


def _embed_part(part_items, first_index, advance, *, kinds, encoders, image_loader, batch_size, pool, model):
    """Load and encode one part's items, consumed from an iterator a batch at a time so only one batch of raw
    items is held (two with a decoding pool: the next one decodes meanwhile). Returns (embeddings per kind,
    metadata rows, skipped items, number of items consumed): what embedding_folder.write_parts commits as the
    part."""
    rows, skipped, consumed = [], [], 0
    chunks = {kind: [] for kind in kinds}

    def load(index_and_item):
        return _load_or_skip(kinds, index_and_item[1], index_and_item[0], image_loader)

    def read() -> list:
        """The next batch of (index, item) pairs of this part (empty at its end)."""
        nonlocal consumed
        batch = list(itertools.islice(part_items, batch_size))
        pairs = list(zip(range(first_index + consumed, first_index + consumed + len(batch)), batch))
        consumed += len(batch)
        return pairs

    def start_next():
        """A callable giving the next loaded batch. With a pool the batch is read and its loading started now,
        so it decodes (PIL releases the GIL) while the current batch is encoded; without one, it is read and
        loaded when called, so only one batch of raw items is held."""
        if pool is None:
            return lambda: [load(pair) for pair in read()]
        futures = [pool.submit(load, pair) for pair in read()]
        return lambda: [future.result() for future in futures]

    pending = start_next()
    while loaded := pending():
        pending = start_next()  # with a pool, the next batch decodes while this one is encoded
        batch_rows = [row for row, _ in loaded if row is not None]
        skipped.extend(entry for row, entry in loaded if row is None)
        if batch_rows:
            for kind in kinds:
                payloads = [entry[kind] for row, entry in loaded if row is not None]
                chunks[kind].append(_checked_finite(_encode(encoders[kind], payloads), kind, batch_rows, model))
            rows.extend(batch_rows)
        advance(len(loaded))
    embeddings = {
        kind: np.concatenate(chunks[kind]) if chunks[kind] else np.zeros((0, 0), dtype=np.float16) for kind in kinds
    }
    return embeddings, rows, skipped, consumed


def _checked_finite(embeddings: np.ndarray, kind: str, rows: list[dict], model: str | None) -> np.ndarray:
    """The batch's embeddings, refused (naming the model and the item) when one holds a NaN or an infinity:
    written, it would be scored, indexed and searched as if it meant something."""
    if (row := first_non_finite(embeddings)) is not None:
        raise NonFiniteEmbeddingError(
            f"the model {model or '(unnamed)'} gives a non-finite {kind} embedding (NaN or infinity) for item "
            f"{rows[row]['index']} ({rows[row]['source']}): its weights are broken (a run that diverged?); "
            "embed with a sound checkpoint")
    return embeddings


def embed_to_folder(
    items: Iterable,
    encode_batch: Callable | Mapping[str, Callable],
    out_dir: str | Path,
    *,
    kind: str = "image",
    part_size: int = 10_000,
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    image_loader: Callable = load_image,
    num_workers: int = 0,
    progress: bool = True,
    total: int | None = None,
    model: str | os.PathLike | None = None,
) -> dict | None:
    """Embed items into the embedding folder out_dir (see openalign.inference.embedding_folder); returns the
    summary or None.

    items: paths (image sources) or mappings with "source" (or "key"), "caption" (or "text") and optionally
    "image" (bytes or a PIL image, e.g. from a WebDataset shard). encode_batch: a callable taking a list of
    RGB PIL images (kind "image") or strings (kind "text") and returning (B, D); for kind "both" a mapping
    {"image": callable, "text": callable}. An item whose image_loader raises ImageLoadError (or that lacks a
    caption when texts are embedded) is skipped and listed. num_workers > 0 decodes images on that many
    threads, the next batch's while the current one is encoded. part_size items go to a part, rank r of
    world_size writes the parts p with p % world_size == r, and a rerun resumes. The summary is returned by the
    rank that finds every part done at its end (rank 0 under torch.distributed, after a barrier); other ranks
    return None. total: the number of items, when known, for the progress bar. An embedding holding a NaN or an
    infinity is a NonFiniteEmbeddingError naming `model` (the checkpoint the encoders come from) and the item.
    """
    kinds = KINDS if kind == "both" else (kind,)
    if kind not in KINDS + ("both",):
        raise EmbeddingFolderError(f"kind {kind!r} is not one of image, text, both")
    encoders = dict(encode_batch) if isinstance(encode_batch, Mapping) else {kinds[0]: encode_batch}
    if set(encoders) != set(kinds) or (kind == "both") != isinstance(encode_batch, Mapping):
        raise EmbeddingFolderError(
            f"kind {kind!r} needs " + ("a mapping {'image': ..., 'text': ...}" if kind == "both" else "one callable")
        )
    if batch_size < 1:
        raise EmbeddingFolderError(f"batch_size {batch_size} must be positive")

    pool = ThreadPoolExecutor(max_workers=num_workers) if num_workers > 0 else None
    fill_part = functools.partial(_embed_part, kinds=kinds, encoders=encoders, image_loader=image_loader,
                                  batch_size=batch_size, pool=pool, model=None if model is None else str(model))
    try:
        return write_parts(items, out_dir, fill_part, kinds=kinds, part_size=part_size, rank=rank,
                           world_size=world_size, progress=progress, total=total)
    finally:
        if pool is not None:
            pool.shutdown()
