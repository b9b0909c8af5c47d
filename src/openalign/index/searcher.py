"""Index: a built index folder loaded (memory-mapped where it can be) and searched by vectors, texts or images.

Loading checks what it can cheaply, so that damage is an error naming the file rather than wrong answers or a
crash later: every file's size against files.json, and that the metadata, the inverted lists and the float16
copy all hold the index's number of vectors. `openalign index --verify` checks every byte.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from openalign.index.common import IndexBuildError, IndexPlan, import_faiss, quiet_native_stdout
from openalign.index.folder import (
    FAISS_FILE,
    INDEX_FILE,
    LISTS_FILE,
    VECTORS_FILE,
    check_files,
    read_index_json,
    read_metadata,
)
from openalign.inference.model_record import model_mismatch, read_model_record


def _read_faiss(index_dir: Path, flags: int):
    try:
        with quiet_native_stdout():
            return import_faiss().read_index(str(index_dir / FAISS_FILE), flags)
    except RuntimeError as error:
        raise IndexBuildError(f"{index_dir / FAISS_FILE} cannot be read ({str(error).splitlines()[-1][:200]}); "
                              "rebuild the index") from None


def _check_counts(index_dir: Path, faiss_index, metadata: pa.Table, rerank_store) -> None:
    """The metadata, the float16 copy and the on-disk lists must all describe faiss_index.ntotal vectors."""
    faiss = import_faiss()
    count = faiss_index.ntotal
    if metadata.num_rows != count:
        raise IndexBuildError(f"{index_dir}: metadata has {metadata.num_rows} rows but the index {count} vectors")
    if rerank_store is None:
        return
    if rerank_store.shape != (count, faiss_index.d):
        raise IndexBuildError(f"{index_dir / VECTORS_FILE} holds {rerank_store.shape} vectors, the index "
                              f"({count}, {faiss_index.d}); rebuild the index")
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(faiss_index).invlists)
    listed = sum(invlists.list_size(number) for number in range(invlists.nlist))
    lists_bytes = (index_dir / LISTS_FILE).stat().st_size
    if listed != count or lists_bytes < getattr(invlists, "totsize", 0):
        raise IndexBuildError(f"{index_dir / LISTS_FILE}: {lists_bytes} bytes listing {listed} vectors, the index "
                              f"has {count} in {getattr(invlists, 'totsize', '?')} bytes; rebuild the index")


class Index:
    """A saved index with its metadata, searchable by vectors, texts or images.

    rerank_store: the float16 (N, D) vectors an "ivfpq" index re-scores its candidates against (memory-mapped),
    None for the other kinds, which re-rank inside FAISS. folder: where it was loaded from (None when built in
    memory), whose model.json says which model's queries it answers (model_record, model_mismatch).
    """

    def __init__(
        self,
        faiss_index,
        metadata: pa.Table,
        plan: IndexPlan,
        encode_texts=None,
        encode_images=None,
        rerank_store: np.ndarray | None = None,
        folder: Path | None = None,
    ):
        self.faiss_index = faiss_index
        self.metadata = metadata
        self.plan = plan
        self.encode_texts = encode_texts
        self.encode_images = encode_images
        self.rerank_store = rerank_store
        self.folder = folder

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

        memory_map: map the stored vectors and codes of "flat", "ivfsq" and "pq" indexes from the file instead of
        reading them into memory (pages are read on first touch and can be dropped by the OS). An "ivfpq"
        index always maps its inverted lists and its float16 copy; metadata.arrow is always mapped.
        """
        faiss = import_faiss()
        index_dir = Path(index_dir)
        for name in (FAISS_FILE, INDEX_FILE):
            if not (index_dir / name).exists():
                config = read_index_json(index_dir) if (index_dir / INDEX_FILE).is_file() else {}
                if config.get("stage", "merged") != "merged":
                    raise IndexBuildError(
                        f"{index_dir} is a sharded build at stage {config['stage']!r}: merge its shards first")
                raise IndexBuildError(f"{index_dir / name} is missing: is {index_dir} an index folder?")
        config = read_index_json(index_dir)
        check_files(index_dir)
        plan = IndexPlan.from_json(config["plan"])
        rerank_store = None
        if (index_dir / LISTS_FILE).exists():
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR  # the lists file travels with the folder
            try:
                rerank_store = np.load(index_dir / VECTORS_FILE, mmap_mode="r")
            except (OSError, ValueError) as error:
                raise IndexBuildError(f"{index_dir / VECTORS_FILE} cannot be read ({error}); rebuild the index") \
                    from None
        else:
            flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if memory_map else 0
        faiss_index = _read_faiss(index_dir, flags)
        metadata = read_metadata(index_dir)
        _check_counts(index_dir, faiss_index, metadata, rerank_store)
        return cls(faiss_index, metadata, plan, encode_texts, encode_images, rerank_store, index_dir)

    def __len__(self) -> int:
        return self.faiss_index.ntotal

    @property
    def dim(self) -> int:
        """Dimension of the indexed vectors (a model's embeddings must have it to be searched here)."""
        return self.faiss_index.d

    @property
    def model_record(self) -> dict | None:
        """The folder's model.json ({"model", "absolute"?, "fingerprint"?}), None when there is none."""
        return read_model_record(self.folder) if self.folder is not None else None

    def model_mismatch(self, model_folder: str | Path) -> str | None:
        """Why the model in model_folder is not the one the indexed vectors were made with (config and weights
        hashed, compared with model.json), or None when it is or cannot be told."""
        return model_mismatch(self.folder, model_folder) if self.folder is not None else None

    def _search_parameters(self, nprobe, k_factor):
        faiss = import_faiss()
        base = None
        if self.plan.nlist:
            base = faiss.SearchParametersIVF(nprobe=min(nprobe or self.plan.nprobe, self.plan.nlist))
        if "Refine" in self.plan.factory:
            return faiss.IndexRefineSearchParameters(k_factor=k_factor or self.plan.k_factor, base_index_params=base)
        return base

    def candidate_ids(self, queries: np.ndarray, count: int, nprobe: int | None = None) -> np.ndarray:
        """(Q, count) ids of the best candidates by the compressed codes alone, best first (-1 past the end):
        what re-ranking re-scores. Flat indexes have no codes: their exact top count."""
        faiss = import_faiss()
        base_index, parameters = self.faiss_index, None
        if "Refine" in self.plan.factory:
            base_index = faiss.downcast_index(faiss.downcast_index(self.faiss_index).base_index)
        if self.plan.nlist:
            parameters = faiss.SearchParametersIVF(nprobe=min(nprobe or self.plan.nprobe, self.plan.nlist))
        return base_index.search(np.ascontiguousarray(queries, dtype=np.float32), count, params=parameters)[1]

    def search_ids(self, queries: np.ndarray, k: int, nprobe: int | None = None,
                   k_factor: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the top k of (Q, D) unit float32 queries, without metadata (search_vectors checks and
        normalises its queries, then calls this); an "ivfpq" index re-scores k_factor * k candidates from its
        float16 copy."""
        parameters = self._search_parameters(nprobe, k_factor)
        if self.rerank_store is None:
            return self.faiss_index.search(queries, k, params=parameters)
        candidates = min(len(self), k * max(1, k_factor or self.plan.k_factor))
        _, candidate_ids = self.faiss_index.search(queries, max(k, candidates), params=parameters)
        return rerank(queries, candidate_ids, self.rerank_store, k)

    def search_vectors(self, queries, k: int = 10, *, nprobe: int | None = None, k_factor: int | None = None):
        """Top-k by inner product for (Q, D) queries (normalised here), at the index's tuned settings unless
        nprobe / k_factor say otherwise.

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
        scores, ids = self.search_ids(np.ascontiguousarray(queries), int(k), nprobe, k_factor)
        rows = []
        for query_ids, query_scores in zip(ids, scores):
            found = query_ids >= 0
            hits = self.metadata_rows(query_ids[found])
            for hit, item_id, score in zip(hits, query_ids[found], query_scores[found]):
                hit.update(id=int(item_id), score=float(score))
            rows.append(hits)
        return scores, ids, rows

    def metadata_rows(self, ids: Sequence[int]) -> list[dict]:
        """The metadata of ids as dicts, in their order. Row by row: the table is memory-mapped in one chunk a
        part, and Table.take over chunks reads far more than the rows (70 ms for 10 rows of 200,000 here, 0.1 ms
        this way)."""
        return [self.metadata.slice(int(item_id), 1).to_pylist()[0] for item_id in ids]

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


def rerank(queries: np.ndarray, candidate_ids: np.ndarray, vectors, k: int):
    """Exact top-k of each query among its candidates, scored against vectors (e.g. a memory-mapped float16
    copy; anything indexed by an id array). Returns (scores (Q, k) float32, ids (Q, k) int64), padded with
    -inf / -1 past the candidates."""
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
