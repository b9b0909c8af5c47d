"""The embedding folder: its on-disk layout, the resumable rank-sharded writer of its parts, and its readers.

Layout: clip-retrieval's, so that its tools and autofaiss read the folder as they read their own (kind is
"image" or "text"; a folder may hold both, each in its own subfolder, sharing one metadata file a part):

    img_emb/img_emb_00000.npy       (n, D) float16, L2-normalised, one row per item that loaded (kind image)
    text_emb/text_emb_00000.npy     the same items' caption embeddings (kind text)
    metadata/metadata_00000.parquet index (global item number), source, caption, width, height per row
    embed_config.json               part_size, kinds and layout; a resumed run must use the same ones
    part-00000.skipped.json         items of the part that could not be loaded, with the reason
    part-00000.done                 commit marker, written last
    summary.json                    count, dim, parts and every skipped item, written once all parts are done
    model.json                      the checkpoint the embeddings were made with (written by whoever knows it)

A part whose items all failed to load writes no .npy or .parquet (clip-retrieval's readers would take a
(0, 0) array for a dimension), only its marker; part numbers have five digits, so that the lexicographic
order in which clip-retrieval and autofaiss list files is the numeric order up to 100,000 parts. Folders
written before this layout (part-00000.image.npy, part-00000.parquet beside the markers; no "layout" in
embed_config.json) are still read, and a resumed run goes on in the layout its folder has.

Items are numbered globally in iteration order; part p holds items [p * part_size, (p + 1) * part_size) and
rank r of world_size writes the parts with p % world_size == r, so ranks never share a file and the result
is independent of the number of ranks. Every file goes to a temporary name and is renamed into place; the
.done marker is renamed last (with the size and SHA-256 of each of the part's files), so a part without it is
redone from scratch after a crash, a part with it is skipped, and one whose files were removed or changed since
is redone (and named by the readers: sizes at every read, every byte by verify_embedding_folder, which an index
build runs first). What fills a part (embedding items, or scoring them) is the caller's: write_parts
only walks the stream, skips finished and other ranks' parts, and commits the parts it is handed.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from openalign.errors import OpenAlignError
from openalign.files import atomic_write, atomic_write_bytes, describe_files, files_problem
from openalign.inference.model_record import (  # noqa: F401 (the folder's model record, imported from here too)
    MODEL_FILE,
    copy_model_reference,
    read_model_reference,
    write_model_reference,
)

logger = logging.getLogger(__name__)

KINDS = ("image", "text")
LAYOUT = "clip-retrieval"
LEGACY_LAYOUT = None  # part-00000.image.npy and part-00000.parquet beside the markers
_KIND_FOLDERS = {"image": "img_emb", "text": "text_emb"}
METADATA_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("source", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)

# fill_part(part_items, first_index, advance) -> (arrays by kind, metadata rows, skipped entries, items consumed)
PartFiller = Callable[
    [Iterator, int, Callable[[int], object]], tuple[dict[str, np.ndarray], list[dict], list[dict], int]
]


class EmbeddingFolderError(OpenAlignError, ValueError):
    """An embedding folder is incomplete, inconsistent with the requested run, or holds a malformed part."""


class NonFiniteEmbeddingError(EmbeddingFolderError):
    """An embedding holds a NaN or an infinity (a model with broken weights); names the model or part and the
    item. Such a vector matches nothing, so an index of them answers nothing, and scores of them rank nothing."""


def first_non_finite(embeddings: np.ndarray) -> int | None:
    """The first row of (n, D) embeddings that holds a NaN or an infinity; None when every value is finite.
    Every reader of a folder calls it on every part, so float16 (the folder's type) is tested on its bits: an
    exponent of all ones is an infinity or a NaN, and masking it costs a fraction of np.isfinite's float16 path."""
    if embeddings.dtype == np.float16:
        bad = (embeddings.view(np.uint16) & 0x7C00) == 0x7C00
    else:
        bad = ~np.isfinite(embeddings)
    return int(np.argmax(bad.any(axis=1))) if bad.any() else None


def part_name(part_index: int) -> str:
    """File stem of a part's markers: part-00042."""
    return f"part-{part_index:05d}"


def embeddings_path(out_dir: Path, part_index: int, kind: str, layout: str | None = LAYOUT) -> Path:
    """A part's embeddings of one kind: img_emb/img_emb_00042.npy or text_emb/text_emb_00042.npy (legacy:
    part-00042.image.npy)."""
    if layout == LAYOUT:
        folder = _KIND_FOLDERS[kind]
        return Path(out_dir) / folder / f"{folder}_{part_index:05d}.npy"
    return Path(out_dir) / f"{part_name(part_index)}.{kind}.npy"


def metadata_path(out_dir: Path, part_index: int, layout: str | None = LAYOUT) -> Path:
    """A part's metadata: metadata/metadata_00042.parquet (legacy: part-00042.parquet)."""
    if layout == LAYOUT:
        return Path(out_dir) / "metadata" / f"metadata_{part_index:05d}.parquet"
    return Path(out_dir) / f"{part_name(part_index)}.parquet"


# ------------------------------------------------------------------------------------------------------------
# Writing


def _write_npy(path: Path, array: np.ndarray) -> None:
    def write(temporary):
        with open(temporary, "wb") as handle:
            np.save(handle, array)

    atomic_write(path, write)


def write_part(out_dir: Path, part_index: int, arrays: dict[str, np.ndarray], rows: list[dict],
               skipped: list[dict], layout: str | None = LAYOUT) -> None:
    """Commit one part: an .npy per kind and the metadata rows (unless every item failed), the skipped items,
    then the .done marker."""
    stem = part_name(part_index)
    if rows or layout != LAYOUT:
        for kind, array in arrays.items():
            path = embeddings_path(out_dir, part_index, kind, layout)
            path.parent.mkdir(exist_ok=True)
            _write_npy(path, array)
        table = pa.Table.from_pylist(rows, schema=METADATA_SCHEMA)
        path = metadata_path(out_dir, part_index, layout)
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, lambda temporary: pq.write_table(table, temporary))
    atomic_write_bytes(out_dir / f"{stem}.skipped.json", json.dumps(skipped, indent=1).encode())
    files = _part_files(out_dir, part_index, list(arrays), len(rows), layout)
    done = {"count": len(rows), "skipped": len(skipped), "dims": {k: int(a.shape[1]) for k, a in arrays.items()},
            **describe_files(out_dir, files)}
    atomic_write_bytes(out_dir / f"{stem}.done", json.dumps(done, sort_keys=True).encode())


def _part_files(out_dir: Path, part_index: int, kinds: list[str], count: int, layout: str | None) -> list[Path]:
    """The files a committed part consists of, its marker aside."""
    files = [out_dir / f"{part_name(part_index)}.skipped.json"]
    if count or layout != LAYOUT:
        files += [embeddings_path(out_dir, part_index, kind, layout) for kind in kinds]
        files.append(metadata_path(out_dir, part_index, layout))
    return files


def verify_part(out_dir: str | Path, part_index: int, layout: str | None = LAYOUT, *,
                check_bytes: bool = False, kind: str | None = None) -> dict:
    """The .done marker of a finished part, after checking that every file of the part is there with the size
    it was written with (and with check_bytes, the SHA-256: a flipped byte); EmbeddingFolderError naming the file
    otherwise (removed, truncated or replaced since). kind: check only that kind's embeddings (and the rest)."""
    out_dir = Path(out_dir)
    marker = out_dir / f"{part_name(part_index)}.done"
    try:
        done = json.loads(marker.read_text())
    except FileNotFoundError:
        raise EmbeddingFolderError(f"{marker} is missing: the part was never finished") from None
    except (OSError, ValueError) as error:
        raise EmbeddingFolderError(f"{marker} is unreadable ({error})") from None
    # Markers written before sizes were recorded list none: then the files must at least exist.
    sizes = done.get("sizes") or {path.relative_to(out_dir).as_posix(): None for path in _part_files(
        out_dir, part_index, list(done.get("dims", {})), done.get("count", 0), layout)}
    if kind is not None:
        others = {embeddings_path(out_dir, part_index, other, layout).relative_to(out_dir).as_posix()
                  for other in KINDS if other != kind}
        sizes = {name: size for name, size in sizes.items() if name not in others}
    problem = files_problem(out_dir, sizes, done.get("sha256") if check_bytes else None)
    if problem is not None:
        raise EmbeddingFolderError(f"{out_dir}: {problem}; rerun the same embed command to redo its part")
    return done


def verify_embedding_folder(out_dir: str | Path, kind: str | None = None) -> None:
    """Check every byte of a finished folder's parts (of one kind) against the SHA-256 in their markers: a read
    of the whole folder, done once by a reader about to rely on all of it (an index build). Markers written
    before checksums were recorded are checked by size."""
    out_dir = Path(out_dir)
    summary = read_summary(out_dir)
    kind = _resolve_kind(out_dir, summary, kind)
    for part in summary["parts"]:
        verify_part(out_dir, int(part["name"].split("-")[1]), summary.get("layout", LEGACY_LAYOUT),
                    check_bytes=True, kind=kind)


def _part_is_done(out_dir: Path, part_index: int, layout: str | None) -> bool:
    """Whether a part is finished and intact; a damaged one is logged, and redone by the caller."""
    if not (out_dir / f"{part_name(part_index)}.done").exists():
        return False
    try:
        verify_part(out_dir, part_index, layout)
    except EmbeddingFolderError as error:
        logger.warning("redoing a damaged part: %s", error)
        (out_dir / f"{part_name(part_index)}.done").unlink(missing_ok=True)
        (out_dir / "summary.json").unlink(missing_ok=True)
        return False
    return True


def _check_config(out_dir: Path, config: dict) -> str | None:
    """Write embed_config.json, or check that a resumed run uses the same part size and kinds; returns the
    folder's layout (a folder begun before the clip-retrieval layout goes on in its own)."""
    path = out_dir / "embed_config.json"
    if path.exists():
        existing = json.loads(path.read_text())
        layout = existing.get("layout", LEGACY_LAYOUT)
        # A folder begun before the layout was recorded goes on in its own: compare the rest.
        if {**existing, "layout": layout} != {**config, "layout": layout}:
            if not any(out_dir.glob("*.done")):  # nothing finished under the old settings: a corrected rerun
                path.unlink(missing_ok=True)
                return _check_config(out_dir, config)
            raise EmbeddingFolderError(
                f"{path} was written with {existing}, this run asks for {config}, and parts are finished "
                "under the first: rerun with those settings to resume, or use a fresh folder"
            )
        return layout
    # Ranks start together: each fills a private temporary file and publishes it with os.link, which is atomic
    # and refuses an existing name, so exactly one rank creates the file and no rank reads it half written.
    temporary = out_dir / f".embed_config.{os.getpid()}.{threading.get_ident()}.tmp"
    temporary.write_text(json.dumps(config, sort_keys=True))
    try:
        os.link(temporary, path)
    except FileExistsError:
        return _check_config(out_dir, config)
    except OSError:  # a file system without hard links: publish by rename (atomic, last writer wins)
        os.replace(temporary, path)
        return _check_config(out_dir, config)
    finally:
        temporary.unlink(missing_ok=True)
    return config.get("layout", LEGACY_LAYOUT)


def write_parts(items: Iterable, out_dir: str | Path, fill_part: PartFiller, *, kinds: tuple[str, ...],
                part_size: int, rank: int = 0, world_size: int = 1, progress: bool = True,
                description: str = "embed", total: int | None = None) -> dict | None:
    """Walk items in parts of part_size, fill and commit this rank's unfinished parts; return the summary.

    total: how many items there are (default: len(items) when it has one), for the progress bar's total.

    fill_part(part_items, first_index, advance) consumes an iterator over one part's items (numbered from
    first_index), calls advance(n) as it gets through n of them (the progress bar), and returns (arrays by
    kind, metadata rows, skipped entries, items consumed). The summary is returned by the rank that finds every
    part done at its end (rank 0 under torch.distributed, after a barrier); other ranks return None.
    """
    if not 0 <= rank < world_size:
        raise EmbeddingFolderError(f"rank {rank} is outside world_size {world_size}")
    if part_size < 1:
        raise EmbeddingFolderError(f"part_size {part_size} must be positive")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = _check_config(out_dir, {"kinds": list(kinds), "part_size": part_size, "layout": LAYOUT})

    progress_bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        # Rank 0 counts only its own items; items/s times world_size is the job's rate.
        total = len(items) if total is None and hasattr(items, "__len__") else total
        if total is not None:
            num_parts = -(-total // part_size)
            total = sum(min(part_size, total - p * part_size) for p in range(rank, num_parts, world_size))
        label = description if world_size == 1 else f"{description} rank 0/{world_size}"
        progress_bar = tqdm(total=total, unit="item", desc=label, dynamic_ncols=True)
    advance = progress_bar.update if progress_bar is not None else lambda count: None
    iterator = iter(items)
    num_parts = 0
    try:
        for part_index in itertools.count():
            # Every rank walks the whole item stream so the global numbering agrees; items of other ranks'
            # parts and of finished parts are read past without decoding.
            part_items = itertools.islice(iterator, part_size)
            if part_index % world_size != rank or _part_is_done(out_dir, part_index, layout):
                consumed = sum(1 for _ in part_items)
            else:
                arrays, rows, skipped, consumed = fill_part(part_items, part_index * part_size, advance)
                if consumed:
                    write_part(out_dir, part_index, arrays, rows, skipped, layout)
            if consumed == 0:
                break
            num_parts = part_index + 1
            if consumed < part_size:
                break
    finally:
        if progress_bar is not None:
            progress_bar.close()

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        return write_summary(out_dir, num_parts) if rank == 0 else None
    return write_summary(out_dir, num_parts)


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
        done = verify_part(out_dir, part_index, config.get("layout", LEGACY_LAYOUT))
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
    if config.get("layout", LEGACY_LAYOUT) != LEGACY_LAYOUT:
        summary["layout"] = config["layout"]
    # Several ranks may finish together and all write the (identical) summary.
    atomic_write_bytes(out_dir / "summary.json", json.dumps(summary, indent=1, sort_keys=True).encode(), shared=True)
    return summary


# ------------------------------------------------------------------------------------------------------------
# Reading


def _resolve_kind(out_dir: Path, summary: dict, kind: str | None) -> str:
    if kind is None:
        if len(summary["kinds"]) != 1:
            raise EmbeddingFolderError(
                f"{out_dir} holds {' and '.join(summary['kinds'])} embeddings: choose one (openalign index "
                f"--embed-kind {'|'.join(summary['kinds'])}; embed_kind= in Python)")
        return summary["kinds"][0]
    if kind not in summary["kinds"]:
        raise EmbeddingFolderError(f"{out_dir} holds {summary['kinds']} embeddings, not {kind!r}")
    return kind


def read_summary(out_dir: str | Path) -> dict:
    """summary.json of a finished embedding folder; the error says which parts are missing otherwise."""
    out_dir = Path(out_dir)
    path = out_dir / "summary.json"
    if not path.exists():
        started = {int(p.stem.rsplit("_", 1)[1]) for p in out_dir.glob("metadata/metadata_*.parquet")}
        started |= {int(p.stem.split("-")[1]) for p in out_dir.glob("part-*.parquet")}
        unfinished = [part_name(i) for i in sorted(started) if not (out_dir / f"{part_name(i)}.done").exists()]
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
    layout = summary.get("layout", LEGACY_LAYOUT)
    for part in summary["parts"]:
        if part["count"] == 0:
            continue
        part_index = int(part["name"].split("-")[1])
        verify_part(out_dir, part_index, layout)
        embeddings = np.load(embeddings_path(out_dir, part_index, kind, layout), mmap_mode="r")
        metadata = pq.read_table(metadata_path(out_dir, part_index, layout))
        if embeddings.shape[0] != metadata.num_rows or embeddings.shape[0] != part["count"]:
            raise EmbeddingFolderError(
                f"{out_dir / part['name']}: {embeddings.shape[0]} embeddings, {metadata.num_rows} metadata rows, "
                f"summary says {part['count']}"
            )
        if (row := first_non_finite(embeddings)) is not None:
            raise NonFiniteEmbeddingError(
                f"{embeddings_path(out_dir, part_index, kind, layout)}: row {row} "
                f"({metadata.column('source')[row].as_py()}) is not finite (NaN or infinity): the model that wrote "
                "it is broken; embed again with a sound checkpoint")
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
