"""Search latency (k=10, one query at a time) of the exact and the approximate index, and recall@10.

Random Gaussian vectors, L2-normalised: the hardest case for approximate search, since they have no cluster
structure. The approximate index is the one openalign's rule picks past 100k vectors (choose_index kind "pq").
Latency goes through Index.search_vectors, metadata lookup included. Not a test.

    python benchmarks/search.py                    # 1M x 640 latency, recall on 100k
    python benchmarks/search.py --n 300000 --json  # smaller, machine-readable

Measured here with the defaults (2 shared AMD EPYC cores, other jobs running: load average 4-5; 1 thread):
exact Flat p50 638 ms / p99 1116 ms; PQ320x4fs,Refine(SQfp16) p50 45 ms / p99 74 ms (14x faster, 1.44 GB
instead of 2.56 GB); recall@10 against exact on 100k x 640 with 1000 random queries: 0.474 without
re-ranking, 0.923 / 0.976 / 0.994 / 0.999 at k_factor 8 / 16 / 32 (the default) / 64.
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np
import pyarrow as pa

from openalign.index.faiss_index import Index, choose_index


def random_unit_vectors(rng, count, dim, chunk=100_000):
    """Yield (chunk, dim) float32 unit vectors so the whole set is never held twice."""
    for start in range(0, count, chunk):
        block = rng.standard_normal((min(chunk, count - start), dim), dtype=np.float32)
        yield block / np.linalg.norm(block, axis=1, keepdims=True)


def build(kind, count, dim, seed):
    """An Index of `count` random vectors built with the plan choose_index gives for `kind`."""
    plan = choose_index(count, dim, kind=kind)
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    started = time.perf_counter()
    if not index.is_trained:
        sample = next(random_unit_vectors(np.random.default_rng(seed), min(count, 65_536), dim, chunk=65_536))
        index.train(sample)
    for block in random_unit_vectors(np.random.default_rng(seed), count, dim):
        index.add(block)
    build_seconds = time.perf_counter() - started
    metadata = pa.table({"source": pa.array([f"vector-{i}" for i in range(count)])})
    return Index(index, metadata, plan), build_seconds


def latency_ms(index, queries, k, **search_arguments):
    """Per-query wall time of single-query searches, in milliseconds."""
    timings = []
    for query in queries:
        started = time.perf_counter()
        index.search_vectors(query[None], k, **search_arguments)
        timings.append(1000 * (time.perf_counter() - started))
    return np.array(timings)


def recall_at_k(ids, exact_ids):
    """Mean fraction of the exact top-k found in the approximate top-k."""
    return float(np.mean([len(set(row) & set(exact_row)) / exact_row.size for row, exact_row in zip(ids, exact_ids)]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors for the latency measurement")
    parser.add_argument("--recall-n", type=int, default=100_000, help="vectors for the recall measurement")
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--queries", type=int, default=200, help="single queries timed per index")
    parser.add_argument("--recall-queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    arguments = parser.parse_args()
    faiss.omp_set_num_threads(arguments.threads)
    k = arguments.k
    query_generator = np.random.default_rng(12345)  # independent of the database seeds
    results = {
        "n": arguments.n,
        "recall_n": arguments.recall_n,
        "dim": arguments.dim,
        "k": k,
        "threads": arguments.threads,
        "latency": {},
        "recall": {},
    }

    # Recall on recall_n vectors, approximate against exact, for a few re-ranking depths.
    exact, _ = build("flat", arguments.recall_n, arguments.dim, seed=1)
    approximate, _ = build("pq", arguments.recall_n, arguments.dim, seed=1)
    queries = next(random_unit_vectors(query_generator, arguments.recall_queries, arguments.dim))
    _, exact_ids, _ = exact.search_vectors(queries, k)
    for k_factor in (1, 8, 16, 32, 64):
        _, ids, _ = approximate.search_vectors(queries, k, k_factor=k_factor)
        results["recall"][f"k_factor={k_factor}"] = recall_at_k(ids, exact_ids)
    results["recall_plan"] = approximate.plan.factory
    del exact, approximate

    # Latency on n vectors, one index at a time to bound memory.
    queries = next(random_unit_vectors(query_generator, arguments.queries, arguments.dim))
    for kind in ("flat", "pq"):
        index, build_seconds = build(kind, arguments.n, arguments.dim, seed=2)
        index.search_vectors(queries[:5], k)  # warm-up: first-touch page faults
        timings = latency_ms(index, queries, k)
        results["latency"][kind] = {
            "factory": index.plan.factory,
            "build_s": build_seconds,
            "estimated_bytes": index.plan.estimated_bytes,
            "p50_ms": float(np.percentile(timings, 50)),
            "p99_ms": float(np.percentile(timings, 99)),
        }
        del index
    speedup = results["latency"]["flat"]["p50_ms"] / results["latency"]["pq"]["p50_ms"]
    results["approximate_speedup_p50"] = speedup

    if arguments.json:
        print(json.dumps(results, indent=1))
        return
    print(f"latency, k={k}, one query at a time, {arguments.n} x {arguments.dim}, {arguments.threads} thread(s)")
    print(f"{'index':6} {'factory':28} {'build s':>8} {'memory MB':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for kind, row in results["latency"].items():
        print(
            f"{kind:6} {row['factory']:28} {row['build_s']:8.1f} {row['estimated_bytes'] / 1e6:10.0f} "
            f"{row['p50_ms']:8.2f} {row['p99_ms']:8.2f}"
        )
    print(f"approximate / exact speed-up at p50: {speedup:.1f}x")
    print(
        f"\nrecall@{k} of {results['recall_plan']} against exact, {arguments.recall_n} x {arguments.dim}, "
        f"{arguments.recall_queries} random queries"
    )
    for setting, recall in results["recall"].items():
        print(f"  {setting:12} {recall:.4f}")


if __name__ == "__main__":
    main()
