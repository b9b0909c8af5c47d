"""What an index build reads from a finished embedding folder, one part at a time: which kind and dimension,
a random sample, the vectors in order, the metadata. Nothing here holds more than one part (or the sample)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from openalign.files import reporting_full_disk
from openalign.index.common import IndexBuildError
from openalign.inference.embedding_folder import iter_embedding_parts, read_summary


def resolve_embed_kind(embed_dir: Path, embed_kind: str | None) -> tuple[dict, str, int]:
    """(summary, embed_kind, dim) of a finished embedding folder, refusing an ambiguous or empty one."""
    summary = read_summary(embed_dir)
    if embed_kind is None:
        if len(summary["kinds"]) != 1:
            raise IndexBuildError(
                f"{embed_dir} holds {' and '.join(summary['kinds'])} embeddings: choose one with --embed-kind "
                "(embed_kind= in Python)"
            )
        embed_kind = summary["kinds"][0]
    dim = summary["dims"].get(embed_kind)
    if not summary["count"] or not dim:
        raise IndexBuildError(f"{embed_dir} holds no {embed_kind} embeddings to index")
    return summary, embed_kind, dim


def sample_rows(embed_dir, embed_kind, rows: np.ndarray) -> np.ndarray:
    """The given global rows (sorted, unique) as float32, gathered one part at a time."""
    gathered, offset = [], 0
    for embeddings, _ in iter_embedding_parts(embed_dir, embed_kind):
        wanted = rows[(rows >= offset) & (rows < offset + len(embeddings))] - offset
        gathered.append(np.asarray(embeddings[wanted], dtype=np.float32))
        offset += len(embeddings)
    return np.concatenate(gathered)


def training_sample(embed_dir, embed_kind, num_vectors, sample_size, seed=0) -> np.ndarray:
    """A uniform random sample of rows across all parts, float32, gathered one part at a time."""
    chosen = np.sort(np.random.default_rng(seed).choice(num_vectors, size=sample_size, replace=False))
    return sample_rows(embed_dir, embed_kind, chosen)


def write_metadata(embed_dir: Path, embed_kind: str, path: Path) -> int:
    """Concatenate the parts' metadata into one Arrow IPC file at path, a part at a time; returns the rows."""
    temporary = path.with_name(path.name + ".tmp")
    writer, rows = None, 0
    with reporting_full_disk(path):
        for _, metadata in iter_embedding_parts(embed_dir, embed_kind):
            if writer is None:
                writer = pa.ipc.new_file(str(temporary), metadata.schema)
            writer.write_table(metadata)
            rows += metadata.num_rows
        if writer is not None:
            writer.close()
            os.replace(temporary, path)
    return rows
