"""FAISS indexes over embedding folders, saved with their metadata: build_index and Index.

Which kind an index is (flat, pq, ivfpq) is decided by openalign.index.plan.choose_index; the "ivfpq" build
and its shards are in openalign.index.ivf.

A built index folder holds index.faiss, metadata.arrow (row i describes vector i; Arrow IPC, memory-mapped
on load) and index.json; an "ivfpq" folder also lists.ivfdata and vectors.npy. Folders written before
metadata.arrow existed hold metadata.parquet, which is still read.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from openalign.index.plan import (  # noqa: F401 (re-exported: the names users import from here)
    DEFAULT_K_FACTOR,
    EXACT_MAX_VECTORS,
    INDEX_KINDS,
    IndexBuildError,
    IndexPlan,
    _faiss,
    choose_index,
)
from openalign.inference.embedding_folder import iter_embedding_parts, read_summary

METADATA_FILE = "metadata.arrow"
LEGACY_METADATA_FILE = "metadata.parquet"


@contextlib.contextmanager
def quiet_native_stdout():
    """Send what C++ code prints on file descriptor 1 to /dev/null meanwhile.

    FAISS's on-disk inverted lists print progress lines ("resizing ...", "updating ondisk filename ...") with
    printf, which would otherwise land inside `openalign search --json` output.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


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


def training_sample(embed_dir, embed_kind, num_vectors, sample_size, seed=0) -> np.ndarray:
    """A uniform random sample of rows across all parts, float32, gathered one part at a time."""
    chosen = np.sort(np.random.default_rng(seed).choice(num_vectors, size=sample_size, replace=False))
    rows, offset = [], 0
    for embeddings, _ in iter_embedding_parts(embed_dir, embed_kind):
        wanted = chosen[(chosen >= offset) & (chosen < offset + len(embeddings))] - offset
        rows.append(np.asarray(embeddings[wanted], dtype=np.float32))
        offset += len(embeddings)
    return np.concatenate(rows)


def write_metadata(embed_dir: Path, embed_kind: str, path: Path) -> int:
    """Concatenate the parts' metadata into one Arrow IPC file at path, a part at a time; returns the rows."""
    temporary = path.with_name(path.name + ".tmp")
    writer, rows = None, 0
    for _, metadata in iter_embedding_parts(embed_dir, embed_kind):
        if writer is None:
            writer = pa.ipc.new_file(str(temporary), metadata.schema)
        writer.write_table(metadata)
        rows += metadata.num_rows
    if writer is not None:
        writer.close()
        os.replace(temporary, path)
    return rows


def read_metadata(index_dir: Path) -> pa.Table:
    """The metadata table of an index folder, memory-mapped when it is Arrow IPC (no copy in RAM)."""
    if (index_dir / METADATA_FILE).is_file():
        return pa.ipc.open_file(pa.memory_map(str(index_dir / METADATA_FILE))).read_all()
    if (index_dir / LEGACY_METADATA_FILE).is_file():
        return pq.read_table(index_dir / LEGACY_METADATA_FILE)
    raise IndexBuildError(f"{index_dir / METADATA_FILE} is missing: is {index_dir} an index folder?")


def write_index_json(out_dir: Path, plan: IndexPlan, embed_dir: Path, embed_kind: str, **extra) -> None:
    """index.json: the plan and where the vectors came from (plus any stage information of a sharded build)."""
    config = {"plan": asdict(plan), "embed_dir": str(embed_dir), "embed_kind": embed_kind, **extra}
    (out_dir / "index.json").write_text(json.dumps(config, indent=1))


def build_index(
    embed_dir: str | Path,
    out_dir: str | Path,
    *,
    kind: str = "auto",
    memory_budget_bytes: int | None = None,
    embed_kind: str | None = None,
    exact_max_vectors: int = EXACT_MAX_VECTORS,
) -> IndexPlan:
    """Build an index over a finished embedding folder (see openalign.inference.embed) and save it in out_dir.

    embed_kind picks image or text embeddings when the folder holds both. Vectors are added one part at a
    time, so peak memory is the index plus one part (and the training sample for approximate kinds); an
    "ivfpq" index does not even hold its own lists in memory (openalign.index.ivf).
    """
    faiss = _faiss()
    embed_dir, out_dir = Path(embed_dir), Path(out_dir)
    summary, embed_kind, dim = resolve_embed_kind(embed_dir, embed_kind)
    plan = choose_index(
        summary["count"],
        dim,
        kind=kind,
        memory_budget_bytes=memory_budget_bytes,
        exact_max_vectors=exact_max_vectors,
    )
    if plan.kind == "ivfpq":
        from openalign.index.ivf import build_ivf_index

        return build_ivf_index(embed_dir, out_dir, plan, embed_kind)
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        # 4-bit PQ has 16 centroids per sub-quantiser: 65,536 points train them well.
        index.train(training_sample(embed_dir, embed_kind, summary["count"], min(summary["count"], 65_536)))
    for embeddings, _ in iter_embedding_parts(embed_dir, embed_kind):
        index.add(np.ascontiguousarray(embeddings, dtype=np.float32))

    out_dir.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out_dir / "index.faiss"))
    write_metadata(embed_dir, embed_kind, out_dir / METADATA_FILE)
    write_index_json(out_dir, plan, embed_dir, embed_kind)
    return plan


def _read_index_json(index_dir: Path) -> dict:
    path = index_dir / "index.json"
    try:
        config = json.loads(path.read_text())
        IndexPlan.from_json(config["plan"])
    except (ValueError, KeyError, TypeError) as error:
        raise IndexBuildError(f"{path} is not an index description ({error})") from error
    return config


class Index:
    """A saved index with its metadata, searchable by vectors, texts or images.

    rerank_store: the float16 (N, D) vectors an "ivfpq" index re-scores its candidates against (memory-mapped),
    None for the other kinds, which re-rank inside FAISS.
    """

    def __init__(
        self,
        faiss_index,
        metadata: pa.Table,
        plan: IndexPlan,
        encode_texts=None,
        encode_images=None,
        rerank_store: np.ndarray | None = None,
    ):
        self.faiss_index = faiss_index
        self.metadata = metadata
        self.plan = plan
        self.encode_texts = encode_texts
        self.encode_images = encode_images
        self.rerank_store = rerank_store

    @classmethod
    def load(
        cls,
        index_dir: str | Path,
        *,
        encode_texts: Callable | None = None,
        encode_images: Callable | None = None,
        memory_map: bool = False,
    ) -> Index:
        """Load an index folder written by build_index; the encoders are used by search(texts=, images=).

        memory_map: map the stored vectors and codes of "flat" and "pq" indexes from the file instead of
        reading them into memory (pages are read on first touch and can be dropped by the OS). An "ivfpq"
        index always maps its inverted lists and its float16 copy; metadata.arrow is always mapped.
        """
        faiss = _faiss()
        index_dir = Path(index_dir)
        config = _read_index_json(index_dir) if (index_dir / "index.json").is_file() else {}
        if config.get("stage", "merged") != "merged":
            raise IndexBuildError(
                f"{index_dir} is a sharded build at stage {config['stage']!r}: merge its shards first"
            )
        for name in ("index.faiss", "index.json"):
            if not (index_dir / name).exists():
                raise IndexBuildError(f"{index_dir / name} is missing: is {index_dir} an index folder?")
        plan = IndexPlan.from_json(config["plan"])
        rerank_store = None
        if (index_dir / "lists.ivfdata").exists():
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR  # the lists file travels with the folder
            rerank_store = np.load(index_dir / "vectors.npy", mmap_mode="r")
        else:
            flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if memory_map else 0
        with quiet_native_stdout():
            faiss_index = faiss.read_index(str(index_dir / "index.faiss"), flags)
        metadata = read_metadata(index_dir)
        stored = faiss_index.ntotal if rerank_store is None else min(faiss_index.ntotal, len(rerank_store))
        if metadata.num_rows != stored:
            raise IndexBuildError(
                f"{index_dir}: metadata has {metadata.num_rows} rows but the index {faiss_index.ntotal} vectors"
            )
        return cls(faiss_index, metadata, plan, encode_texts, encode_images, rerank_store)

    def __len__(self) -> int:
        return self.faiss_index.ntotal

    @property
    def dim(self) -> int:
        """Dimension of the indexed vectors."""
        return self.faiss_index.d

    def _search_parameters(self, nprobe, k_factor):
        faiss = _faiss()
        base = None
        if self.plan.nlist:
            base = faiss.SearchParametersIVF(nprobe=min(nprobe or self.plan.nprobe, self.plan.nlist))
        if "Refine" in self.plan.factory:
            return faiss.IndexRefineSearchParameters(k_factor=k_factor or self.plan.k_factor, base_index_params=base)
        return base

    def _search_ids(self, queries: np.ndarray, k: int, nprobe, k_factor) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the top k; an "ivfpq" index re-scores k_factor * k candidates from its float16 copy."""
        parameters = self._search_parameters(nprobe, k_factor)
        if self.rerank_store is None:
            return self.faiss_index.search(queries, k, params=parameters)
        candidates = min(len(self), k * max(1, k_factor or self.plan.k_factor))
        _, candidate_ids = self.faiss_index.search(queries, max(k, candidates), params=parameters)
        return rerank(queries, candidate_ids, self.rerank_store, k)

    def search_vectors(self, queries, k: int = 10, *, nprobe: int | None = None, k_factor: int | None = None):
        """Top-k by inner product for (Q, D) queries (normalised here).

        Returns (scores (Q, k) float32, ids (Q, k) int64, rows): rows[q] lists the metadata dicts of query
        q's hits, best first, each with its "id" and "score". Ids of -1 (fewer than k vectors) are dropped
        from rows.
        """
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise IndexBuildError(f"queries have dim {queries.shape[1]}, the index {self.dim}")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise IndexBuildError(f"k must be a positive number of hits, not {k!r}")
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        scores, ids = self._search_ids(np.ascontiguousarray(queries), int(k), nprobe, k_factor)
        hit_rows = self.metadata.take(pa.array(np.where(ids >= 0, ids, 0).ravel())).to_pylist()
        rows = []
        for query_index in range(len(queries)):
            query_rows = []
            for rank in range(ids.shape[1]):
                if ids[query_index, rank] < 0:
                    continue
                row = dict(hit_rows[query_index * ids.shape[1] + rank])
                row.update(id=int(ids[query_index, rank]), score=float(scores[query_index, rank]))
                query_rows.append(row)
            rows.append(query_rows)
        return scores, ids, rows

    def stored_vectors(self, ids: Sequence[int]) -> np.ndarray | None:
        """(n, D) float32 vectors the index holds for ids (exact for flat and float16 copies), or None when
        the index keeps only codes it cannot decode."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.rerank_store is not None:
            return np.asarray(self.rerank_store[ids], dtype=np.float32)
        try:
            return self.faiss_index.reconstruct_batch(ids)
        except RuntimeError:
            return None

    def search(
        self,
        texts: Sequence[str] | None = None,
        images: Sequence | None = None,
        k: int = 10,
        *,
        encode_texts: Callable | None = None,
        encode_images: Callable | None = None,
        nprobe: int | None = None,
        k_factor: int | None = None,
    ) -> list[list[dict]]:
        """Hits for each text query, then each image query: one list of metadata dicts (with score) per query.

        The encoders default to those given to Index.load; they map a list of queries to (Q, D) embeddings.
        """
        batches = []
        for queries, encoder, name in (
            (texts, encode_texts or self.encode_texts, "texts"),
            (images, encode_images or self.encode_images, "images"),
        ):
            if not queries:
                continue
            if encoder is None:
                raise IndexBuildError(f"search({name}=...) needs an encode_{name} callable")
            embeddings = encoder(list(queries))
            embeddings = embeddings.detach().float().cpu().numpy() if hasattr(embeddings, "detach") else embeddings
            batches.append(np.asarray(embeddings, dtype=np.float32))
        if not batches:
            raise IndexBuildError("search needs texts= or images=")
        return self.search_vectors(np.concatenate(batches), k, nprobe=nprobe, k_factor=k_factor)[2]


def rerank(queries: np.ndarray, candidate_ids: np.ndarray, vectors: np.ndarray, k: int):
    """Exact top-k of each query among its candidates, scored against vectors (e.g. a memory-mapped float16
    copy). Returns (scores (Q, k) float32, ids (Q, k) int64), padded with -inf / -1 past the candidates."""
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for query_index, query in enumerate(queries):
        candidates = np.unique(candidate_ids[query_index][candidate_ids[query_index] >= 0])  # sorted: in file order
        if not len(candidates):
            continue
        candidate_scores = np.asarray(vectors[candidates], dtype=np.float32) @ query
        # Best first; among equal scores the lower id, as exact search orders them.
        order = np.lexsort((candidates, -candidate_scores))[:k]
        scores[query_index, : len(order)] = candidate_scores[order]
        ids[query_index, : len(order)] = candidates[order]
    return scores, ids
