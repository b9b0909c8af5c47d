"""FAISS indexes over embedding folders, saved with their metadata.

The rule (choose_index), for N vectors of dimension D, all L2-normalised and searched by inner product:

- exact ("flat", IndexFlatIP): N <= 100,000 and the N * D * 4 bytes fit the memory budget. Results are those
  of brute force; a single query scans every vector (about 12 ms for 100k x 640 on one core here).
- approximate ("pq"): otherwise. Every vector gets a 4-bit product-quantisation code of D/2 bytes (two
  dimensions per sub-quantiser), scanned exhaustively with FAISS's SIMD "fast-scan" kernels; the best
  k_factor * k candidates are re-scored against a second copy of the vectors (IndexRefine). That copy is
  float16 (2D bytes a vector) when it fits the budget, else 8-bit scalar-quantised (D bytes), else absent.
  No inverted lists: on unclustered data (random vectors, the hardest case) an IVF probe misses most true
  neighbours unless it visits most lists, while the exhaustive fast-scan stays cheap and keeps recall@10
  above 0.95 (measured in benchmarks/search.py).
- approximate with inverted lists ("ivfpq"): only on request (kind="ivfpq"), for collections so large that
  even the fast-scan pass is too slow; nlist = 4 * sqrt(N), nprobe defaults to nlist / 8 and is a search
  argument. Real image embeddings are clustered, so it does much better on them than on random vectors.

A built index folder holds index.faiss, metadata.parquet (row i describes vector i) and index.json.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from openalign.errors import OpenAlignError
from openalign.inference.embed import iter_embedding_parts, read_summary

EXACT_MAX_VECTORS = 100_000
DEFAULT_K_FACTOR = 32
INDEX_KINDS = ("auto", "flat", "pq", "ivfpq")


class IndexBuildError(OpenAlignError, ValueError):
    """An index cannot be built or loaded: unknown kind, budget too small, or a malformed index folder."""


def _faiss():
    try:
        import faiss
    except ImportError as error:  # an optional dependency: name the extra that installs it
        raise IndexBuildError("faiss is not installed: pip install 'openalign[index]'") from error
    return faiss


@dataclass
class IndexPlan:
    """What choose_index decided: the FAISS factory string, search defaults and the memory it needs."""

    kind: str
    factory: str
    num_vectors: int
    dim: int
    estimated_bytes: int
    k_factor: int = 1
    nlist: int = 0
    nprobe: int = 0
    reason: str = ""


def _pq_subquantizers(dim: int) -> int:
    # Two dimensions per 4-bit sub-quantiser when D is even: at D = 640 that is 320 sub-quantisers, 160 bytes.
    return dim // 2 if dim % 2 == 0 else dim


PQ_CENTROIDS = 16  # 4-bit fast-scan codes


def choose_index(
    num_vectors: int,
    dim: int,
    *,
    kind: str = "auto",
    memory_budget_bytes: int | None = None,
    exact_max_vectors: int = EXACT_MAX_VECTORS,
) -> IndexPlan:
    """Apply the module's rule; memory_budget_bytes=None means no limit."""
    if kind not in INDEX_KINDS:
        raise IndexBuildError(f"index kind {kind!r} is not one of {', '.join(INDEX_KINDS)}")
    budget = math.inf if memory_budget_bytes is None else memory_budget_bytes
    flat_bytes = num_vectors * dim * 4
    if kind == "flat" or (kind == "auto" and num_vectors <= exact_max_vectors and flat_bytes <= budget):
        if flat_bytes > budget:
            raise IndexBuildError(f"an exact index needs {flat_bytes} bytes, over the budget of {budget}")
        reason = "requested" if kind == "flat" else f"N={num_vectors} <= {exact_max_vectors} and fits the budget"
        return IndexPlan("flat", "Flat", num_vectors, dim, flat_bytes, reason=reason)

    if num_vectors < PQ_CENTROIDS:
        raise IndexBuildError(
            f"an approximate ({kind}) index trains {PQ_CENTROIDS} centroids per sub-quantizer and needs at least "
            f"{PQ_CENTROIDS} vectors; this collection has {num_vectors}: use kind='flat'"
        )
    subquantizers = _pq_subquantizers(dim)
    code_bytes = num_vectors * subquantizers // 2
    nlist = 0
    prefix = ""
    if kind == "ivfpq":
        nlist = max(1, min(int(4 * math.sqrt(num_vectors)), num_vectors // 39 or 1))
        prefix = f"IVF{nlist},"
        code_bytes += nlist * dim * 4
    # The most accurate re-ranking store that fits: float16 copy, 8-bit copy, or none.
    fitting = [
        (refine, code_bytes + num_vectors * bytes_per_vector)
        for refine, bytes_per_vector in (("SQfp16", 2 * dim), ("SQ8", dim), (None, 0))
        if code_bytes + num_vectors * bytes_per_vector <= budget
    ]
    if not fitting:
        raise IndexBuildError(
            f"even PQ codes alone need {code_bytes} bytes for {num_vectors} x {dim}, over the budget of {budget}"
        )
    refine, estimated = fitting[0]
    factory = f"{prefix}PQ{subquantizers}x4fs" + (f",Refine({refine})" if refine else "")
    reason = (
        "requested" if kind != "auto" else f"N={num_vectors} > {exact_max_vectors} or exact over budget"
    ) + f"; re-ranking store {refine or 'none (budget)'}"
    return IndexPlan(
        "ivfpq" if kind == "ivfpq" else "pq",
        factory,
        num_vectors,
        dim,
        estimated,
        k_factor=DEFAULT_K_FACTOR if refine else 1,
        nlist=nlist,
        nprobe=max(1, nlist // 8) if nlist else 0,
        reason=reason,
    )


def _training_sample(embed_dir, embed_kind, num_vectors, sample_size, seed=0) -> np.ndarray:
    """A uniform random sample of rows across all parts, float32, gathered one part at a time."""
    chosen = np.sort(np.random.default_rng(seed).choice(num_vectors, size=sample_size, replace=False))
    rows, offset = [], 0
    for embeddings, _ in iter_embedding_parts(embed_dir, embed_kind):
        wanted = chosen[(chosen >= offset) & (chosen < offset + len(embeddings))] - offset
        rows.append(np.asarray(embeddings[wanted], dtype=np.float32))
        offset += len(embeddings)
    return np.concatenate(rows)


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
    time, so peak memory is the index plus one part (and the training sample for approximate kinds).
    """
    faiss = _faiss()
    embed_dir, out_dir = Path(embed_dir), Path(out_dir)
    summary = read_summary(embed_dir)
    if embed_kind is None:
        if len(summary["kinds"]) != 1:
            raise IndexBuildError(f"{embed_dir} holds {summary['kinds']} embeddings: pass embed_kind=")
        embed_kind = summary["kinds"][0]
    dim = summary["dims"].get(embed_kind)
    if not summary["count"] or not dim:
        raise IndexBuildError(f"{embed_dir} holds no {embed_kind} embeddings to index")
    plan = choose_index(
        summary["count"],
        dim,
        kind=kind,
        memory_budget_bytes=memory_budget_bytes,
        exact_max_vectors=exact_max_vectors,
    )
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        # 4-bit PQ has 16 centroids per sub-quantiser and IVF wants about 40 points per list.
        sample_size = min(summary["count"], max(65_536, 40 * plan.nlist))
        index.train(_training_sample(embed_dir, embed_kind, summary["count"], sample_size))
    tables = []
    for embeddings, metadata in iter_embedding_parts(embed_dir, embed_kind):
        index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
        tables.append(metadata)

    out_dir.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out_dir / "index.faiss"))
    pq.write_table(pa.concat_tables(tables), out_dir / "metadata.parquet")
    config = {"plan": asdict(plan), "embed_dir": str(embed_dir), "embed_kind": embed_kind}
    (out_dir / "index.json").write_text(json.dumps(config, indent=1))
    return plan


class Index:
    """A saved index with its metadata, searchable by vectors, texts or images."""

    def __init__(self, faiss_index, metadata: pa.Table, plan: IndexPlan, encode_texts=None, encode_images=None):
        self.faiss_index = faiss_index
        self.metadata = metadata
        self.plan = plan
        self.encode_texts = encode_texts
        self.encode_images = encode_images

    @classmethod
    def load(
        cls,
        index_dir: str | Path,
        *,
        encode_texts: Callable | None = None,
        encode_images: Callable | None = None,
        memory_map: bool = False,
    ) -> Index:
        """Load an index folder written by build_index; the encoders are used by search(texts=, images=)."""
        faiss = _faiss()
        index_dir = Path(index_dir)
        for name in ("index.faiss", "metadata.parquet", "index.json"):
            if not (index_dir / name).exists():
                raise IndexBuildError(f"{index_dir / name} is missing: is {index_dir} an index folder?")
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if memory_map else 0
        faiss_index = faiss.read_index(str(index_dir / "index.faiss"), flags)
        plan = IndexPlan(**json.loads((index_dir / "index.json").read_text())["plan"])
        metadata = pq.read_table(index_dir / "metadata.parquet")
        if metadata.num_rows != faiss_index.ntotal:
            raise IndexBuildError(
                f"{index_dir}: metadata has {metadata.num_rows} rows but the index {faiss_index.ntotal} vectors"
            )
        return cls(faiss_index, metadata, plan, encode_texts, encode_images)

    def __len__(self) -> int:
        return self.faiss_index.ntotal

    def _search_parameters(self, nprobe, k_factor):
        faiss = _faiss()
        if self.plan.kind == "flat":
            return None
        base = None
        if self.plan.kind == "ivfpq":
            base = faiss.SearchParametersIVF(nprobe=nprobe or self.plan.nprobe)
        if "Refine" in self.plan.factory:
            return faiss.IndexRefineSearchParameters(k_factor=k_factor or self.plan.k_factor, base_index_params=base)
        return base

    def search_vectors(self, queries, k: int = 10, *, nprobe: int | None = None, k_factor: int | None = None):
        """Top-k by inner product for (Q, D) queries (normalised here).

        Returns (scores (Q, k) float32, ids (Q, k) int64, rows): rows[q] lists the metadata dicts of query
        q's hits, best first, each with its "id" and "score". Ids of -1 (fewer than k vectors) are dropped
        from rows.
        """
        _check_k(k)
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.faiss_index.d:
            raise IndexBuildError(f"queries have dim {queries.shape[1]}, the index {self.faiss_index.d}")
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        parameters = self._search_parameters(nprobe, k_factor)
        scores, ids = self.faiss_index.search(np.ascontiguousarray(queries), k, params=parameters)
        hit_rows = self.metadata.take(pa.array(np.where(ids >= 0, ids, 0).ravel())).to_pylist()
        rows = []
        for query_index in range(len(queries)):
            query_rows = []
            for rank in range(k):
                if ids[query_index, rank] < 0:
                    continue
                row = dict(hit_rows[query_index * k + rank])
                row.update(id=int(ids[query_index, rank]), score=float(scores[query_index, rank]))
                query_rows.append(row)
            rows.append(query_rows)
        return scores, ids, rows

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
        _check_k(k)  # before the queries are encoded
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


def _check_k(k) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise IndexBuildError(f"k = {k!r}: the number of hits per query must be a positive integer")
