"""Which index an embedding folder gets. The rule (choose_index), for N vectors of dimension D, all
L2-normalised and searched by inner product:

- exact ("flat", IndexFlatIP): N <= 100,000 and the N * D * 4 bytes fit the memory budget. Results are those
  of brute force; a single query scans every vector (about 12 ms for 100k x 640 on one core here).
- approximate, float16 vectors in inverted lists ("ivfsq", IndexIVFScalarQuantizer): N <= 1,000,000 and the
  N * (2D + 8) bytes fit the budget. k-means puts the vectors in nlist lists (the power of two nearest
  4 sqrt(N)); a query scores every vector of its nprobe nearest lists, exactly to float16. On vectors from
  clusters of very different sizes and spreads (benchmarks/search.py) it reached recall@10 0.96 at 0.6 ms where
  4-bit codes, however deeply re-ranked, stopped at 0.86: inside a tight cluster the codes cannot order the
  neighbours. On unclustered vectors (random, the hardest case) the tuning raises nprobe towards all the
  lists, a scan of every float16 vector.
- approximate, codes in memory ("pq"): requested, or below 10,000 vectors when "ivfsq" does not fit the budget
  (from 10,000 on, "ivfpq" takes that place: its float16 copy is on disk). Every vector gets a 4-bit
  product-quantisation code of D/4 bytes (two dimensions per sub-quantiser), scanned with FAISS's SIMD
  "fast-scan" kernels; the best k_factor * k candidates are re-scored against a second copy of the vectors
  (IndexRefine). That copy is float16 (2D bytes a vector) when it fits the budget, else 8-bit scalar-quantised
  (D bytes), else absent. From 100,000 vectors on, inverted lists (nlist near 4 sqrt(N)) put the codes in
  lists, and a query scans the nprobe nearest.
- approximate with inverted lists on disk ("ivfpq", openalign.index.ivf): past 1,000,000 vectors, or when
  "ivfsq" does not fit the budget. The coarse quantiser sends each vector to one of nlist lists;
  a query scans the nprobe nearest lists of 8-bit PQ codes, then re-scores k_factor * k candidates against a
  float16 copy of the vectors kept on disk and memory-mapped. The lists live on disk too (memory-mapped), so
  the budget holds only the lists' codes and ids that the page cache should keep; it is built from the
  embedding parts without loading them all, by several processes if wanted, and merged.

The rule's nprobe and k_factor are starting points only: every build measures recall on the collection's own
vectors and keeps the cheapest settings that reach the target (openalign.index.tuning).

Sizes of "ivfpq": nlist is the power of two nearest 2 * sqrt(N) (8,192 at 10M), so a list holds about sqrt(N) / 2
vectors; codes take D/4 bytes (160 at D = 640) plus 8 for the id, the largest of D/4, D/8, D/16, D/32 that fits
the budget.
"""

from __future__ import annotations

import contextlib
import math

from openalign.index.common import IndexBuildError, IndexPlan

EXACT_MAX_VECTORS = 100_000
EXHAUSTIVE_MAX_VECTORS = 1_000_000
DEFAULT_K_FACTOR = 32
INDEX_KINDS = ("auto", "flat", "ivfsq", "pq", "ivfpq")
# The rule's re-ranking depth for "ivfpq" before tuning: 8-bit codes order candidates roughly, and re-scoring
# from the float16 copy costs little.
IVF_K_FACTOR = 64
IVF_MIN_VECTORS = 10_000  # 39 training points for each of the 256 centroids of an 8-bit sub-quantiser
PQ_LISTS_MIN_VECTORS = 100_000  # below, the exhaustive fast scan takes about a millisecond
ID_BYTES = 8


def _pq_subquantizers(dim: int) -> int:
    # Two dimensions per 4-bit sub-quantiser when D is even: at D = 640 that is 320 sub-quantisers, 160 bytes.
    return dim // 2 if dim % 2 == 0 else dim


PQ_CENTROIDS = 16  # 4-bit fast-scan codes


def _pq_plan(num_vectors: int, dim: int, budget: float, kind: str, reason: str) -> IndexPlan | None:
    """The fast-scan plan with the most accurate re-ranking store that fits, or None. From PQ_LISTS_MIN_VECTORS
    on, inverted lists in front of the codes let a query scan only the nprobe nearest lists (the tuning raises
    nprobe up to all of them, the exhaustive scan, where the data needs it)."""
    subquantizers = _pq_subquantizers(dim)
    nlist = fast_scan_list_count(num_vectors) if num_vectors >= PQ_LISTS_MIN_VECTORS else 0
    code_bytes = num_vectors * (subquantizers // 2 + (ID_BYTES if nlist else 0)) + nlist * dim * 4
    for refine, bytes_per_vector in (("SQfp16", 2 * dim), ("SQ8", dim), (None, 0)):
        estimated = code_bytes + num_vectors * bytes_per_vector
        if estimated <= budget:
            factory = (f"IVF{nlist}," if nlist else "") + f"PQ{subquantizers}x4fs"
            factory += f",Refine({refine})" if refine else ""
            return IndexPlan(
                kind,
                factory,
                num_vectors,
                dim,
                estimated,
                k_factor=DEFAULT_K_FACTOR if refine else 1,
                nlist=nlist,
                nprobe=max(1, nlist // 16) if nlist else 0,
                reason=f"{reason}; re-ranking store {refine or 'none (budget)'}",
            )
    return None


def ivfsq_plan(num_vectors: int, dim: int, budget: float, *, reason: str) -> IndexPlan | None:
    """Inverted lists of float16 vectors within budget, or None: nlist as for "pq"; 2D bytes a vector, 8 for its
    id in its list and 8 for the map from id to list (stored_vectors)."""
    nlist = fast_scan_list_count(num_vectors)
    estimated = num_vectors * (2 * dim + 2 * ID_BYTES) + nlist * dim * 4
    if estimated > budget or num_vectors < 39:
        return None
    return IndexPlan("ivfsq", f"IVF{nlist},SQfp16", num_vectors, dim, estimated, nlist=nlist,
                     nprobe=max(1, nlist // 16), reason=f"{reason}; float16 vectors in {nlist} lists")


def fast_scan_list_count(num_vectors: int) -> int:
    """nlist of a "pq" index: the power of two nearest 4 * sqrt(N) (FAISS's guideline: 4 to 16 sqrt(N)), at most
    N / 39 (FAISS's minimum of training points per centroid)."""
    target = 2 ** round(math.log2(4 * math.sqrt(num_vectors)))
    return max(1, min(target, num_vectors // 39))


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
    if kind == "ivfpq":
        return ivf_plan(num_vectors, dim, budget, reason="requested")
    if kind == "ivfsq":
        plan = ivfsq_plan(num_vectors, dim, budget, reason="requested")
        if plan is None:
            raise IndexBuildError(f"an ivfsq index of {num_vectors} x {dim} needs {num_vectors * (2 * dim + 16)} "
                                  f"bytes (and at least 39 vectors), over the budget of {budget}")
        return plan

    if num_vectors < PQ_CENTROIDS:
        raise IndexBuildError(
            f"an approximate ({kind}) index trains {PQ_CENTROIDS} centroids per sub-quantizer and needs at least "
            f"{PQ_CENTROIDS} vectors; this collection has {num_vectors}: use kind='flat'"
        )
    reason = "requested" if kind == "pq" else f"N={num_vectors} > {exact_max_vectors} or exact over budget"
    plan = _pq_plan(num_vectors, dim, budget, "pq", reason)
    too_small = IndexBuildError(
        f"even PQ codes alone need {num_vectors * _pq_subquantizers(dim) // 2} bytes for {num_vectors} x {dim}, "
        f"over the budget of {budget}"
    )
    if kind == "pq":
        if plan is None:
            raise too_small
        return plan
    # auto: float16 vectors in inverted lists while they fit the budget (scores of the lists probed are exact to
    # float16; 4-bit codes, however re-ranked, miss neighbours inside tight clusters), else inverted lists on
    # disk (whose float16 copy is on disk too), else fast-scan codes with a smaller re-ranking store.
    if num_vectors <= EXHAUSTIVE_MAX_VECTORS:
        lists = ivfsq_plan(num_vectors, dim, budget, reason=f"N={num_vectors} > {exact_max_vectors} or exact over "
                                                             "budget, and float16 vectors fit")
        if lists is not None:
            return lists
    if num_vectors >= IVF_MIN_VECTORS:
        with contextlib.suppress(IndexBuildError):
            return ivf_plan(num_vectors, dim, budget, reason=f"N={num_vectors} or the float16 copy over budget")
    if plan is None:
        raise too_small
    return plan


def ivf_list_count(num_vectors: int) -> int:
    """nlist: the power of two nearest 2 * sqrt(N), at most N / 39 (FAISS's minimum of points per centroid)."""
    target = 2 ** round(math.log2(2 * math.sqrt(num_vectors)))
    return max(1, min(target, num_vectors // 39))


def _code_sizes(dim: int) -> list[int]:
    """PQ code bytes to try, largest first: D/4, D/8, D/16, D/32 (each must divide D), else one byte. D/4 first:
    on clusters of very different spreads, 200,000 vectors at D = 640 reached recall@10 0.956 with 160-byte
    codes and 128 x k re-ranked, 0.83 with 80-byte codes (0.91 at 256 x k)."""
    sizes = [dim // parts for parts in (4, 8, 16, 32) if dim // parts >= 1 and dim % (dim // parts) == 0]
    return sorted(set(sizes), reverse=True) or [1]


def ivf_plan(num_vectors: int, dim: int, budget: float, *, reason: str) -> IndexPlan:
    """The "ivfpq" plan for N x D within budget bytes of inverted lists (ids, codes, centroids, codebooks)."""
    if num_vectors < IVF_MIN_VECTORS:
        raise IndexBuildError(
            f"an ivfpq index trains 256 centroids per sub-quantizer and needs at least {IVF_MIN_VECTORS} vectors; "
            f"this collection has {num_vectors}: use kind 'flat' or 'pq'"
        )
    nlist = ivf_list_count(num_vectors)
    fixed_bytes = nlist * dim * 4 + 256 * dim * 4
    for code_bytes in _code_sizes(dim):
        estimated = num_vectors * (code_bytes + ID_BYTES) + fixed_bytes
        if estimated <= budget:
            return IndexPlan(
                "ivfpq",
                f"IVF{nlist},PQ{code_bytes}np",  # np: no polysemous training (slow, unused here)
                num_vectors,
                dim,
                estimated,
                k_factor=IVF_K_FACTOR,
                nlist=nlist,
                nprobe=max(1, nlist // 32),
                reason=f"{reason}; lists and float16 re-ranking copy on disk, memory-mapped",
                rerank_bytes=2 * num_vectors * dim,
            )
    smallest = num_vectors * (_code_sizes(dim)[-1] + ID_BYTES) + fixed_bytes
    raise IndexBuildError(
        f"an ivfpq index of {num_vectors} x {dim} needs {smallest} bytes, over the budget of {budget}"
    )
