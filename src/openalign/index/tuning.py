"""Search settings tuned on the collection itself, and the last step of every build (finish_build).

A rule's nprobe and k_factor fit the distribution they were measured on, not a user's: on vectors from clusters
of very different sizes and spreads the rule's "ivfpq" settings found 0.75 of the true top 10 and "pq" 0.87.
So, as autofaiss does, every build measures: it draws a sample of the collection's own vectors as queries, finds
their exact neighbours by brute force over the whole collection (one pass over the parts), measures recall@k of
candidate settings, and keeps the fastest that reaches the target recall.

Each sampled vector is in the index, so it would find itself, an easy hit that fresh queries do not get. Its own
row is therefore dropped from both its exact and its approximate answers (both ask for k + 1 and drop the
query's id): the leave-one-out estimate of a fresh query from the collection's distribution, without a second
build that holds the sample out. Queries of another kind (text queries of an image index) follow another
distribution; the estimate says nothing about them, and benchmarks/search.py measures both against an exact scan.

The search: for each nprobe (powers of two, ascending) one candidate search at the deepest re-ranking wanted,
whose exact scores then give the recall of every k_factor at once (the best m candidates by code are the first m
of a longer list). It stops two doublings past the first nprobe that reaches the target (a larger scan costs
more than any re-ranking saves). The settings that reach the target are timed one query at a time on one
thread, as the server runs, and the fastest kept (the most accurate of those within 5% of it); "Reaches the
target" means the estimate less two standard errors is at least the target, so that fresh queries reach it too.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from openalign.index.common import import_faiss
from openalign.index.folder import publish, read_index_json, update_index_json
from openalign.index.searcher import Index
from openalign.index.sources import sample_rows
from openalign.inference.embedding_folder import iter_embedding_parts
from openalign.inference.model_record import copy_model_reference

logger = logging.getLogger(__name__)

DEFAULT_TARGET_RECALL = 0.95
TUNING_K = 10
SAMPLE_SIZE = 1000
TIMED_QUERIES = 200
K_FACTORS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
EXTRA_DOUBLINGS = 2
TIME_NOISE = 0.05
MARGIN_ERRORS = 2  # standard errors of the estimate kept between it and the target


def exact_neighbours(embed_dir, embed_kind, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) ids of the exact top k by inner product over every part of the folder, one part at a time."""
    from faiss.contrib.exhaustive_search import knn_ground_truth

    faiss = import_faiss()
    blocks = (np.asarray(embeddings, dtype=np.float32) for embeddings, _ in iter_embedding_parts(embed_dir, embed_kind))
    return knn_ground_truth(queries, blocks, k, metric_type=faiss.METRIC_INNER_PRODUCT, ngpu=0)[1]


def _without_self(ids: np.ndarray, own_ids: np.ndarray, k: int) -> np.ndarray:
    """Each row's first k ids other than its own (rows hold k + 1 ids, best first)."""
    is_own = ids == own_ids[:, None]
    order = np.argsort(is_own, axis=1, kind="stable")  # the others first, in their order
    return np.take_along_axis(ids, order, axis=1)[:, :k]


def _recalls(ids: np.ndarray, exact_ids: np.ndarray) -> np.ndarray:
    """Per query: the share of its exact neighbours found."""
    found = (ids[:, :, None] == exact_ids[:, None, :]) & (ids[:, :, None] >= 0)
    return found.any(axis=1).sum(axis=1) / exact_ids.shape[1]


class _Reconstructed:
    """The vectors of ids as a "pq" index re-ranks them: decoded from its re-ranking store (float16 or SQ8)."""

    def __init__(self, index: Index):
        self.index = index

    def __getitem__(self, ids):
        return self.index.stored_vectors(ids)


def _exact_candidate_scores(index: Index, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(Q, C) inner products of each query with its candidates (-inf where a candidate is -1)."""
    store = index.rerank_store if index.rerank_store is not None else _Reconstructed(index)
    scores = np.full(candidates.shape, -np.inf, dtype=np.float32)
    for row, (query, ids) in enumerate(zip(queries, candidates)):
        valid = ids >= 0
        scores[row, valid] = np.asarray(store[ids[valid]], dtype=np.float32) @ query
    return scores


def _recall_by_k_factor(index, queries, own_ids, exact_ids, nprobe, k_factors, k) -> dict[int, np.ndarray]:
    """{k_factor: per-query recall} at one nprobe, from one candidate search at the largest k_factor.

    A search for k re-scores k_factor * k candidates; the query's own row takes one more place here (it is
    dropped afterwards), so k_factor * k + 1 are re-scored: as many others as a fresh query gets."""
    if k_factors == [1]:  # no re-ranking: the scores the lists hold decide
        found = index.search_vectors(queries, k + 1, nprobe=nprobe)[1]
        return {1: _recalls(_without_self(found, own_ids, k), exact_ids)}
    deepest = min(len(index), k * max(k_factors) + 1)
    candidates = index.candidate_ids(queries, deepest, nprobe)
    scores = _exact_candidate_scores(index, queries, candidates)
    recalls = {}
    for k_factor in k_factors:
        width = min(deepest, k * k_factor + 1)
        best = min(k + 1, width)
        top = np.argpartition(-scores[:, :width], best - 1, axis=1)[:, :best]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1), axis=1)
        found = np.take_along_axis(candidates, top, axis=1)
        recalls[k_factor] = _recalls(_without_self(found, own_ids, k), exact_ids)
    return recalls


def _time_setting(index: Index, queries: np.ndarray, k: int, nprobe, k_factor) -> tuple[float, float]:
    """(p50, p99) milliseconds of single queries on one thread, as the server answers them."""
    faiss = import_faiss()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.search_vectors(queries[:10], k, nprobe=nprobe, k_factor=k_factor)  # first touches of mapped pages
        times = []
        for query in queries:
            started = time.perf_counter()
            index.search_vectors(query[None], k, nprobe=nprobe, k_factor=k_factor)
            times.append(1000 * (time.perf_counter() - started))
    finally:
        faiss.omp_set_num_threads(threads)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def _reaches(recalls: np.ndarray, target: float) -> bool:
    return recalls.mean() - MARGIN_ERRORS * recalls.std() / np.sqrt(len(recalls)) >= target


def tune_search(index: Index, embed_dir, embed_kind: str, *, target_recall: float = DEFAULT_TARGET_RECALL,
                k: int = TUNING_K, sample_size: int = SAMPLE_SIZE, seed: int = 0) -> dict:
    """Measure recall@k of candidate nprobe / k_factor settings on a sample of the collection's own vectors
    (leave-one-out, see the module) and return the tuning record: the chosen settings, their recall estimate
    with its sample size and standard error, what was measured and timed. index.plan is not changed."""
    started = time.perf_counter()
    plan = index.plan
    record = {"target_recall": target_recall, "k": k, "method": "leave-one-out on the collection's own vectors"}
    if plan.kind == "flat":
        return {**record, "recall": 1.0, "recall_standard_error": 0.0, "sample_size": 0, "reached": True,
                "nprobe": 0, "k_factor": 1, "measured": [], "timed": [], "seconds": 0.0}
    rng = np.random.default_rng(seed)
    own_ids = np.sort(rng.choice(len(index), size=min(sample_size, len(index) - 1), replace=False))
    queries = sample_rows(embed_dir, embed_kind, own_ids)
    queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    exact_ids = _without_self(exact_neighbours(embed_dir, embed_kind, queries, k + 1), own_ids, k)

    reranks = "Refine" in plan.factory or index.rerank_store is not None
    k_factors = list(K_FACTORS) if reranks else [1]
    nprobes = [2**power for power in range(int(np.log2(plan.nlist)) + 1)] if plan.nlist else [None]
    measured, measured_recalls, feasible, first_reached = [], {}, [], None
    for position, nprobe in enumerate(nprobes):
        recalls = _recall_by_k_factor(index, queries, own_ids, exact_ids, nprobe, k_factors, k)
        for k_factor, values in recalls.items():
            measured.append({"nprobe": nprobe or 0, "k_factor": k_factor, "recall": round(float(values.mean()), 4)})
            measured_recalls[(nprobe or 0, k_factor)] = values
        reaching = [factor for factor in k_factors if _reaches(recalls[factor], target_recall)]
        if reaching:
            feasible.append((nprobe, reaching[0]))  # a deeper re-ranking at this nprobe only costs more
            first_reached = position if first_reached is None else first_reached
        if first_reached is not None and position >= first_reached + EXTRA_DOUBLINGS:
            break
    if not feasible:  # the best that was measured: the widest scan, the deepest re-ranking
        feasible = [(nprobe, k_factors[-1])]
        logger.warning("no search setting of this %s index reaches recall@%d %.2f", plan.kind, k, target_recall)

    timed_queries = queries[:TIMED_QUERIES]
    timed = []
    for nprobe, k_factor in feasible:
        p50, p99 = _time_setting(index, timed_queries, k, nprobe, k_factor)
        timed.append({"nprobe": nprobe or 0, "k_factor": k_factor, "p50_ms": round(p50, 3), "p99_ms": round(p99, 3)})
    # The fastest; among settings within TIME_NOISE of it (one timing run cannot tell them apart), the most accurate.
    fastest = min(setting["p50_ms"] for setting in timed)
    best = max((setting for setting in timed if setting["p50_ms"] <= fastest * (1 + TIME_NOISE)),
               key=lambda setting: measured_recalls[(setting["nprobe"], setting["k_factor"])].mean())
    recalls = measured_recalls[(best["nprobe"], best["k_factor"])]
    return {**record, "recall": round(float(recalls.mean()), 4),
            "recall_standard_error": round(float(recalls.std() / np.sqrt(len(recalls))), 4),
            "sample_size": len(own_ids), "reached": bool(_reaches(recalls, target_recall)),
            "nprobe": best["nprobe"], "k_factor": best["k_factor"], "p50_ms": best["p50_ms"], "p99_ms": best["p99_ms"],
            "measured": measured, "timed": timed, "seconds": round(time.perf_counter() - started, 1)}


def finish_build(work: Path, out_dir: Path, *, target_recall: float = DEFAULT_TARGET_RECALL,
                 stages: dict | None = None) -> dict:
    """The last step of every build, on the assembled building folder: tune the search settings, record them and
    the build's report (stage times) in index.json, record the model, then publish the folder as out_dir.
    Returns index.json's contents."""
    config = read_index_json(work)
    embed_dir, embed_kind = Path(config["embed_dir"]), config["embed_kind"]
    index = Index.load(work)
    tuning = tune_search(index, embed_dir, embed_kind, target_recall=target_recall)
    plan = index.plan
    if plan.kind != "flat":
        plan.nprobe = tuning["nprobe"]
        plan.k_factor = tuning["k_factor"]
        settings = (f"nprobe {plan.nprobe}, " if plan.nlist else "") + f"k_factor {plan.k_factor}"
        plan.reason += f"; {settings} tuned to recall@{tuning['k']} {tuning['recall']:.3f} (target {target_recall})"
    del index
    stages = {**config.get("build", {}).get("stages", {}), **(stages or {}), "tuning_s": tuning["seconds"]}
    config = update_index_json(work, plan=plan, tuning=tuning, build={"stages": stages}, stage="merged")
    copy_model_reference(embed_dir, work)
    publish(work, out_dir)
    return config
