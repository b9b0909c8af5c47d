"""Embedding at scale: stream items through an encoder into a folder of fixed-size parts.

Layout of an embedding folder (kind is "image" or "text"; a run with kind "both" writes both):

    embed_config.json          part_size and kinds; a resumed run must use the same ones
    part-00000.image.npy       (n, D) float16, L2-normalised, one row per item that loaded
    part-00000.parquet         index (global item number), source, caption, width, height per row
    part-00000.skipped.json    items of the part that could not be loaded, with the reason
    part-00000.done            commit marker, written last
    summary.json               count, dim, parts and every skipped item, written once all parts are done

Items are numbered globally in iteration order; part p holds items [p * part_size, (p + 1) * part_size) and
rank r of world_size writes the parts with p % world_size == r, so ranks never share a file and the result
is independent of the number of ranks. Every file goes to a temporary name and is renamed into place; the
.done marker is renamed last, so a part without it is redone from scratch after a crash and a part with it
is skipped. Only one part's embeddings and one batch of raw items are ever held in memory.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from openalign.errors import ImageLoadError, OpenAlignError
from openalign.processing.tokenizer import is_unicode_text

logger = logging.getLogger(__name__)

KINDS = ("image", "text")
METADATA_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("source", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)


class EmbeddingFolderError(OpenAlignError, ValueError):
    """An embedding folder is incomplete, inconsistent with the requested run, or holds a malformed part."""


class MissingCaptionError(OpenAlignError, ValueError):
    """An item has no caption text while texts are being embedded; the item is skipped and listed."""


def part_name(part_index: int) -> str:
    """File stem of a part: part-00042."""
    return f"part-{part_index:05d}"


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


def _atomic_write(path: Path, write: Callable[[Path], None], temporary_suffix: str = ".tmp") -> None:
    temporary = path.with_name(path.name + temporary_suffix)
    write(temporary)
    os.replace(temporary, path)


def _write_bytes(path: Path, data: bytes, temporary_suffix: str = ".tmp") -> None:
    _atomic_write(path, lambda temporary: temporary.write_bytes(data), temporary_suffix)


def _write_npy(path: Path, array: np.ndarray) -> None:
    def write(temporary):
        with open(temporary, "wb") as handle:
            np.save(handle, array)

    _atomic_write(path, write)


def _load_or_skip(kinds, item, index, image_loader):
    """(row, payloads) for an item that loads, or (None, skipped-entry) for one that does not."""
    try:
        return _load(kinds, item, index, image_loader)
    except (ImageLoadError, MissingCaptionError) as error:
        return None, {"index": index, "source": _describe(item, kinds)["source"], "error": str(error)}


def _embed_part(part_items, first_index, kinds, encoders, image_loader, batch_size, progress_bar, pool):
    """Load and encode one part's items, consumed from an iterator a batch at a time so only one batch of raw
    items is held. Returns (embeddings per kind, metadata rows, skipped items, number of items consumed)."""
    rows, skipped, consumed = [], [], 0
    chunks = {kind: [] for kind in kinds}
    while batch := list(itertools.islice(part_items, batch_size)):
        indices = range(first_index + consumed, first_index + consumed + len(batch))
        consumed += len(batch)

        def load(index_and_item):
            return _load_or_skip(kinds, index_and_item[1], index_and_item[0], image_loader)

        # PIL decodes without holding the GIL, so a thread pool overlaps the decoding of a batch.
        loaded = list(pool.map(load, zip(indices, batch))) if pool else [load(pair) for pair in zip(indices, batch)]
        del batch  # free this batch's raw items (image bytes) before the next batch is read
        batch_rows = [row for row, _ in loaded if row is not None]
        skipped.extend(entry for row, entry in loaded if row is None)
        if batch_rows:
            for kind in kinds:
                payloads = [entry[kind] for row, entry in loaded if row is not None]
                chunks[kind].append(_encode(encoders[kind], payloads))
            rows.extend(batch_rows)
        if progress_bar is not None:
            progress_bar.update(len(loaded))
    embeddings = {
        kind: np.concatenate(chunks[kind]) if chunks[kind] else np.zeros((0, 0), dtype=np.float16) for kind in kinds
    }
    return embeddings, rows, skipped, consumed


def _write_part(out_dir: Path, part_index: int, embeddings, rows, skipped) -> None:
    stem = part_name(part_index)
    for kind, array in embeddings.items():
        _write_npy(out_dir / f"{stem}.{kind}.npy", array)
    table = pa.Table.from_pylist(rows, schema=METADATA_SCHEMA)
    _atomic_write(out_dir / f"{stem}.parquet", lambda temporary: pq.write_table(table, temporary))
    _write_bytes(out_dir / f"{stem}.skipped.json", json.dumps(skipped, indent=1).encode())
    done = {"count": len(rows), "skipped": len(skipped), "dims": {k: int(a.shape[1]) for k, a in embeddings.items()},
            "sizes": {name: (out_dir / name).stat().st_size
                      for name in [*(f"{stem}.{kind}.npy" for kind in embeddings), f"{stem}.parquet",
                                   f"{stem}.skipped.json"]}}
    _write_bytes(out_dir / f"{stem}.done", json.dumps(done, sort_keys=True).encode())


def verify_part(out_dir: str | Path, part_index: int) -> dict:
    """The .done marker of a finished part, after checking that every file it lists is there with the size it
    was written with; EmbeddingFolderError naming the file otherwise (deleted, truncated or replaced later)."""
    out_dir = Path(out_dir)
    marker = out_dir / f"{part_name(part_index)}.done"
    try:
        done = json.loads(marker.read_text())
    except FileNotFoundError:
        raise EmbeddingFolderError(f"{marker} is missing: the part was never finished") from None
    except (OSError, ValueError) as error:
        raise EmbeddingFolderError(f"{marker} is unreadable ({error})") from None
    # Markers from before sizes were recorded list no sizes: then the files must at least exist.
    expected = done.get("sizes") or {name: None for name in (
        *(f"{part_name(part_index)}.{kind}.npy" for kind in done.get("dims", {})),
        f"{part_name(part_index)}.parquet", f"{part_name(part_index)}.skipped.json")}
    for name, size in expected.items():
        path = out_dir / name
        if not path.is_file():
            raise EmbeddingFolderError(f"{path} is missing (removed after the run?); rerun the same embed command "
                                       "to redo its part")
        if size is not None and path.stat().st_size != size:
            raise EmbeddingFolderError(f"{path} has {path.stat().st_size} bytes, {size} were written (truncated or "
                                       "replaced); rerun the same embed command to redo its part")
    return done


def _part_is_done(out_dir: Path, part_index: int) -> bool:
    """Whether a part is finished and intact; a damaged one is logged and will be redone."""
    if not (out_dir / f"{part_name(part_index)}.done").exists():
        return False
    try:
        verify_part(out_dir, part_index)
    except EmbeddingFolderError as error:
        logger.warning("redoing a damaged part: %s", error)
        (out_dir / f"{part_name(part_index)}.done").unlink(missing_ok=True)
        (out_dir / "summary.json").unlink(missing_ok=True)
        return False
    return True


def _check_config(out_dir: Path, config: dict) -> None:
    """Write embed_config.json, or check that a resumed run uses the same part size and kinds."""
    path = out_dir / "embed_config.json"
    if path.exists():
        existing = json.loads(path.read_text())
        if existing != config:
            raise EmbeddingFolderError(
                f"{path} was written with {existing}, this run asks for {config}: use a fresh folder"
            )
        return
    # Ranks start together: each fills a private temporary file and publishes it with os.link, which is atomic
    # and refuses an existing name, so exactly one rank creates the file and no rank reads it half written.
    temporary = out_dir / f".embed_config.{os.getpid()}.{threading.get_ident()}.tmp"
    temporary.write_text(json.dumps(config, sort_keys=True))
    try:
        os.link(temporary, path)
    except FileExistsError:
        _check_config(out_dir, config)
    except OSError:  # a file system without hard links: publish by rename (atomic, last writer wins)
        os.replace(temporary, path)
        _check_config(out_dir, config)
    finally:
        temporary.unlink(missing_ok=True)


def write_summary(out_dir: str | Path, num_parts: int) -> dict | None:
    """Merge the parts' markers into summary.json once all num_parts parts are done; None while some are not.

    The summary depends only on the part files, so whichever rank writes it writes the same bytes.
    """
    out_dir = Path(out_dir)
    config = json.loads((out_dir / "embed_config.json").read_text())
    parts, skipped, count, dims = [], [], 0, {}
    for part_index in range(num_parts):
        marker = out_dir / f"{part_name(part_index)}.done"
        if not marker.exists():
            return None
        done = verify_part(out_dir, part_index)
        parts.append({"name": part_name(part_index), "count": done["count"], "skipped": done["skipped"]})
        count += done["count"]
        dims.update({kind: dim for kind, dim in done["dims"].items() if done["count"]})
        skipped.extend(json.loads((out_dir / f"{part_name(part_index)}.skipped.json").read_text()))
    summary = {
        "kinds": config["kinds"],
        "part_size": config["part_size"],
        "count": count,
        "dims": dims,
        "dtype": "float16",
        "num_parts": num_parts,
        "num_skipped": len(skipped),
        "parts": parts,
        "skipped": skipped,
    }
    # Several ranks may finish together and all write the (identical) summary: one temporary file each.
    summary_bytes = json.dumps(summary, indent=1, sort_keys=True).encode()
    _write_bytes(out_dir / "summary.json", summary_bytes, temporary_suffix=f".{os.getpid()}.tmp")
    return summary


def distributed_rank_and_world_size() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else from torchrun's RANK / WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


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
) -> dict | None:
    """Embed items into out_dir as described in the module docstring; returns the summary or None.

    items: paths (image sources) or mappings with "source" (or "key"), "caption" (or "text") and optionally
    "image" (bytes or a PIL image, e.g. from a WebDataset shard). encode_batch: a callable taking a list of
    RGB PIL images (kind "image") or strings (kind "text") and returning (B, D); for kind "both" a mapping
    {"image": callable, "text": callable}. An item whose image_loader raises ImageLoadError (or that lacks a
    caption when texts are embedded) is skipped and listed. num_workers > 0 decodes each batch's images on
    that many threads. The summary is returned by the rank that finds
    every part done at its end (rank 0 under torch.distributed, after a barrier); other ranks return None.
    """
    kinds = KINDS if kind == "both" else (kind,)
    if kind not in KINDS + ("both",):
        raise EmbeddingFolderError(f"kind {kind!r} is not one of image, text, both")
    encoders = dict(encode_batch) if isinstance(encode_batch, Mapping) else {kinds[0]: encode_batch}
    if set(encoders) != set(kinds) or (kind == "both") != isinstance(encode_batch, Mapping):
        raise EmbeddingFolderError(
            f"kind {kind!r} needs " + ("a mapping {'image': ..., 'text': ...}" if kind == "both" else "one callable")
        )
    if not 0 <= rank < world_size:
        raise EmbeddingFolderError(f"rank {rank} is outside world_size {world_size}")
    if part_size < 1 or batch_size < 1:
        raise EmbeddingFolderError(f"part_size {part_size} and batch_size {batch_size} must be positive")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_config(out_dir, {"kinds": list(kinds), "part_size": part_size})

    progress_bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        # Rank 0 counts only its own items; items/s times world_size is the job's rate.
        total = None
        if hasattr(items, "__len__"):
            num_parts = -(-len(items) // part_size)
            total = sum(min(part_size, len(items) - p * part_size) for p in range(rank, num_parts, world_size))
        progress_bar = tqdm(total=total, unit="item", desc=f"embed rank 0/{world_size}", dynamic_ncols=True)
    iterator = iter(items)
    num_parts = 0
    pool = ThreadPoolExecutor(max_workers=num_workers) if num_workers > 0 else None
    try:
        for part_index in itertools.count():
            # Every rank walks the whole item stream so the global numbering agrees; items of other ranks'
            # parts and of finished parts are read past without decoding.
            part_items = itertools.islice(iterator, part_size)
            if part_index % world_size != rank or _part_is_done(out_dir, part_index):
                consumed = sum(1 for _ in part_items)
            else:
                embeddings, rows, skipped, consumed = _embed_part(
                    part_items, part_index * part_size, kinds, encoders, image_loader, batch_size, progress_bar, pool
                )
                if consumed:
                    _write_part(out_dir, part_index, embeddings, rows, skipped)
            if consumed == 0:
                break
            num_parts = part_index + 1
            if consumed < part_size:
                break
    finally:
        if pool is not None:
            pool.shutdown()
        if progress_bar is not None:
            progress_bar.close()

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        return write_summary(out_dir, num_parts) if rank == 0 else None
    return write_summary(out_dir, num_parts)


def _resolve_kind(out_dir: Path, summary: dict, kind: str | None) -> str:
    if kind is None:
        if len(summary["kinds"]) != 1:
            raise EmbeddingFolderError(f"{out_dir} holds {summary['kinds']} embeddings: pass kind=")
        return summary["kinds"][0]
    if kind not in summary["kinds"]:
        raise EmbeddingFolderError(f"{out_dir} holds {summary['kinds']} embeddings, not {kind!r}")
    return kind


def read_summary(out_dir: str | Path) -> dict:
    """summary.json of a finished embedding folder; the error says which parts are missing otherwise."""
    out_dir = Path(out_dir)
    path = out_dir / "summary.json"
    if not path.exists():
        unfinished = sorted(p.name for p in out_dir.glob("part-*.parquet") if not p.with_suffix(".done").exists())
        raise EmbeddingFolderError(
            f"{path} does not exist: the embedding run has not finished"
            + (f" (parts without a .done marker: {', '.join(unfinished[:5])})" if unfinished else "")
        )
    return json.loads(path.read_text())


def iter_embedding_parts(out_dir: str | Path, kind: str | None = None):
    """Yield (embeddings (n, D) float16 memory-mapped, metadata pyarrow.Table) for each non-empty part."""
    out_dir = Path(out_dir)
    summary = read_summary(out_dir)
    kind = _resolve_kind(out_dir, summary, kind)
    for part_index, part in enumerate(summary["parts"]):
        verify_part(out_dir, part_index)
        if part["count"] == 0:
            continue
        embeddings = np.load(out_dir / f"{part['name']}.{kind}.npy", mmap_mode="r")
        metadata = pq.read_table(out_dir / f"{part['name']}.parquet")
        if embeddings.shape[0] != metadata.num_rows or embeddings.shape[0] != part["count"]:
            raise EmbeddingFolderError(
                f"{out_dir / part['name']}: {embeddings.shape[0]} embeddings, {metadata.num_rows} metadata rows, "
                f"summary says {part['count']}"
            )
        yield embeddings, metadata


def read_embedding_folder(out_dir: str | Path, kind: str | None = None):
    """All embeddings of a finished folder as one (N, D) float16 array, plus the metadata pyarrow.Table.

    kind may be left out when the folder holds one kind. Use iter_embedding_parts to stream instead.
    """
    out_dir = Path(out_dir)
    summary = read_summary(out_dir)
    kind = _resolve_kind(out_dir, summary, kind)
    dim = summary["dims"].get(kind, 0)
    embeddings = np.empty((summary["count"], dim), dtype=np.float16)
    tables, filled = [], 0
    for part_embeddings, metadata in iter_embedding_parts(out_dir, kind):
        embeddings[filled : filled + len(part_embeddings)] = part_embeddings
        filled += len(part_embeddings)
        tables.append(metadata)
    metadata = pa.concat_tables(tables) if tables else METADATA_SCHEMA.empty_table()
    return embeddings, metadata
