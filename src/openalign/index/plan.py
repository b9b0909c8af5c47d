"""Which index an embedding folder gets. The rule (choose_index), for N vectors of dimension D, all
L2-normalised and searched by inner product:

- exact ("flat", IndexFlatIP): N <= 100,000 and the N * D * 4 bytes fit the memory budget. Results are those
  of brute force; a single query scans every vector (about 12 ms for 100k x 640 on one core here).
- approximate, exhaustive ("pq"): N <= 1,000,000 and it fits the budget. Every vector gets a 4-bit
  product-quantisation code of D/4 bytes (two dimensions per sub-quantiser), scanned exhaustively with FAISS's
  SIMD "fast-scan" kernels; the best k_factor * k candidates are re-scored against a second copy of the
  vectors (IndexRefine). That copy is float16 (2D bytes a vector) when it fits the budget, else 8-bit
  scalar-quantised (D bytes), else absent. On unclustered data (random vectors, the hardest case) this keeps
  recall@10 above 0.95 where an inverted-list probe would have to visit most lists.
- approximate with inverted lists ("ivfpq", openalign.index.ivf): past 1,000,000 vectors, or when the "pq"
  kind's float16 copy does not fit the budget. The coarse quantiser sends each vector to one of nlist lists;
  a query scans the nprobe nearest lists of 8-bit PQ codes, then re-scores k_factor * k candidates against a
  float16 copy of the vectors kept on disk and memory-mapped. The lists live on disk too (memory-mapped), so
  the budget holds only the lists' codes and ids that the page cache should keep; it is built from the
  embedding parts without loading them all, by several processes if wanted, and merged.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields

from openalign.errors import OpenAlignError

EXACT_MAX_VECTORS = 100_000
EXHAUSTIVE_MAX_VECTORS = 1_000_000
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
    """What choose_index decided: the FAISS factory string, search defaults and the memory it needs.

    estimated_bytes: what the index holds in memory (for "ivfpq": its inverted lists, which are memory-mapped
    from disk). rerank_bytes: the float16 copy an "ivfpq" index re-scores from, on disk and memory-mapped.
    """

    kind: str
    factory: str
    num_vectors: int
    dim: int
    estimated_bytes: int
    k_factor: int = 1
    nlist: int = 0
    nprobe: int = 0
    reason: str = ""
    rerank_bytes: int = 0

    @classmethod
    def from_json(cls, values: dict) -> IndexPlan:
        """The plan saved in an index.json (fields added since are left at their defaults)."""
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


def _pq_subquantizers(dim: int) -> int:
    # Two dimensions per 4-bit sub-quantiser when D is even: at D = 640 that is 320 sub-quantisers, 160 bytes.
    return dim // 2 if dim % 2 == 0 else dim


PQ_CENTROIDS = 16  # 4-bit fast-scan codes


def _pq_plan(num_vectors: int, dim: int, budget: float, kind: str, reason: str) -> IndexPlan | None:
    """The exhaustive fast-scan plan with the most accurate re-ranking store that fits, or None."""
    subquantizers = _pq_subquantizers(dim)
    code_bytes = num_vectors * subquantizers // 2
    for refine, bytes_per_vector in (("SQfp16", 2 * dim), ("SQ8", dim), (None, 0)):
        estimated = code_bytes + num_vectors * bytes_per_vector
        if estimated <= budget:
            factory = f"PQ{subquantizers}x4fs" + (f",Refine({refine})" if refine else "")
            return IndexPlan(
                kind,
                factory,
                num_vectors,
                dim,
                estimated,
                k_factor=DEFAULT_K_FACTOR if refine else 1,
                reason=f"{reason}; re-ranking store {refine or 'none (budget)'}",
            )
    return None


def choose_index(
    num_vectors: int,
    dim: int,
    *,
    kind: str = "auto",
    memory_budget_bytes: int | None = None,
    exact_max_vectors: int = EXACT_MAX_VECTORS,
) -> IndexPlan:
    """Apply the module's rule; memory_budget_bytes=None means no limit."""
    from openalign.index.ivf import IVF_MIN_VECTORS, ivf_plan

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
    # auto: the exhaustive scan while it is fast and keeps its float16 copy in the budget, else inverted lists
    # (whose float16 copy is on disk), else the exhaustive scan with a smaller re-ranking store.
    if plan is not None and num_vectors <= EXHAUSTIVE_MAX_VECTORS and plan.factory.endswith("Refine(SQfp16)"):
        return plan
    if num_vectors >= IVF_MIN_VECTORS:
        with contextlib.suppress(IndexBuildError):
            return ivf_plan(num_vectors, dim, budget, reason=f"N={num_vectors} or the float16 copy over budget")
    if plan is None:
        raise too_small
    return plan
