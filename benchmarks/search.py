"""Search at scale: build time, peak memory, index size, latency and recall@10 of openalign's index on N generated
clustered vectors of dimension 640, written as float16 embedding parts on disk the way `openalign embed` does.

Stages, each in its own process so that its peak memory is its own (ru_maxrss of the child):

1. generate (in the parent, once per --work folder): N unit vectors around N / 2000 random centres (noise
   of the centres' own scale, so neighbourhoods overlap as real embeddings' do), through embed_to_folder
   (parts of 100,000, float16).
2. build: `openalign index EMB --memory-budget BUDGET` (the rule picks the kind: "pq" up to 1M, "ivfpq" past it).
3. serve: a process that loads the index as `openalign serve` does (memory-mapped) and answers single queries,
   first one at a time on one thread, then from 8 threads at once; recall@10 against exact search (a chunked
   scan of the float16 parts in the parent) on a sample of queries; "ivfpq" also at other nprobe values.
   Peak memory of that process is reported as VmHWM (resident pages at their most, memory-mapped file pages
   included: the page cache can drop those) and RssAnon at the end (its private memory).

The exact scan is the peer: its time per query (batched, all cores) is printed beside the index's.

    python benchmarks/search.py --n 1000000 --work /data/bench-1m
    python benchmarks/search.py --n 10000000 --work /data/bench-10m --memory-budget 4GB
    python benchmarks/search.py --n 200000 --kind ivfpq --queries 200    # a quick check of the script

Goal at 10M: recall@10 >= 0.95, p99 <= 50 ms on one thread, serving process peak <= 4 GB. Not a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

DIM = 640
PART_SIZE = 100_000


def generate(n: int, dim: int, out: Path, seed: int = 0) -> None:
    """The embedding folder of N clustered unit vectors (item i's caption is "item i")."""
    import torch

    from openalign.inference.embed import embed_to_folder

    centres = np.random.default_rng(seed).standard_normal((max(100, n // 2000), dim)).astype(np.float32)

    def encode(captions):
        first = int(captions[0].split()[1])  # batches are contiguous runs of items
        rng = np.random.default_rng([seed, first])
        chosen = centres[rng.integers(len(centres), size=len(captions))]
        return torch.from_numpy(chosen + rng.standard_normal(chosen.shape, dtype=np.float32))

    items = ({"source": f"vector-{i}", "caption": f"item {i}"} for i in range(n))
    embed_to_folder(items, encode, out, kind="text", part_size=PART_SIZE, batch_size=10_000, progress=True)


def queries_like(n_queries: int, n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Queries from the same distribution as the collection (new points around the same centres)."""
    centres = np.random.default_rng(seed).standard_normal((max(100, n // 2000), dim)).astype(np.float32)
    rng = np.random.default_rng([seed, 10**12])
    chosen = centres[rng.integers(len(centres), size=n_queries)]
    queries = chosen + rng.standard_normal(chosen.shape, dtype=np.float32)
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def exact_top_k(embed_dir: Path, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Exact top-k ids by a chunked scan of the float16 parts, and its seconds per query (batched)."""
    from openalign.inference.embedding_folder import iter_embedding_parts

    started = time.perf_counter()
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), k), dtype=np.int64)
    offset = 0
    for embeddings, _ in iter_embedding_parts(embed_dir):
        scores = queries @ np.asarray(embeddings, dtype=np.float32).T  # (Q, part)
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_ids, np.broadcast_to(np.arange(offset, offset + len(embeddings)), scores.shape[:1]
                                                        + (len(embeddings),))], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores, best_ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        offset += len(embeddings)
    return best_ids, (time.perf_counter() - started) / len(queries)


def memory_status() -> dict:
    """VmHWM and RssAnon of this process, in bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmHWM", "RssAnon", "RssFile"):
            values[name] = int(rest.split()[0]) * 1024
    return values


def serve_measurements(index_dir: Path, queries: np.ndarray, k: int, nprobes: list, k_factors: list) -> dict:
    """In this (child) process: load as the server does, time single queries, then 8 threads, per nprobe."""
    import faiss

    from openalign.index.faiss_index import Index

    faiss.omp_set_num_threads(1)  # as openalign serve: one thread per query
    started = time.perf_counter()
    index = Index.load(index_dir, memory_map=True)
    results = {"load_s": time.perf_counter() - started, "kind": index.plan.kind, "factory": index.plan.factory,
               "nprobe_default": index.plan.nprobe, "runs": []}
    for nprobe, k_factor in [(n, f) for n in nprobes or [None] for f in k_factors or [None]]:
        index.search_vectors(queries[:20], k, nprobe=nprobe)  # warm-up: first touches of the mapped pages
        single, ids = [], []
        for query in queries:
            began = time.perf_counter()
            ids.append(index.search_vectors(query[None], k, nprobe=nprobe, k_factor=k_factor)[1][0])
            single.append(1000 * (time.perf_counter() - began))

        def one(query, nprobe=nprobe, k_factor=k_factor):
            began = time.perf_counter()
            index.search_vectors(query[None], k, nprobe=nprobe, k_factor=k_factor)
            return 1000 * (time.perf_counter() - began)

        began = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            concurrent = list(pool.map(one, queries))
        wall = time.perf_counter() - began
        results["runs"].append({
            "nprobe": nprobe or index.plan.nprobe or "-",
            "k_factor": k_factor or index.plan.k_factor,
            "ids": np.stack(ids).tolist(),
            "single_p50_ms": float(np.percentile(single, 50)), "single_p99_ms": float(np.percentile(single, 99)),
            "concurrent8_p50_ms": float(np.percentile(concurrent, 50)),
            "concurrent8_p99_ms": float(np.percentile(concurrent, 99)),
            "concurrent8_queries_per_s": len(queries) / wall,
        })
    results["memory"] = memory_status()
    return results


def _child_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def _folder_bytes(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_blocks * 512 for path in folder.iterdir() if path.is_file()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the collection")
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--work", type=Path, help="folder for the embeddings and the index (default ./search-N)")
    parser.add_argument("--kind", default="auto", choices=("auto", "flat", "pq", "ivfpq"))
    parser.add_argument("--memory-budget", default="4GB", help="openalign index --memory-budget")
    parser.add_argument("--queries", type=int, default=1000, help="queries timed and checked against exact")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nprobe", type=int, nargs="*", default=[],
                        help="ivfpq: nprobe values to measure (default: the plan's, then twice and four times it)")
    parser.add_argument("--k-factor", type=int, nargs="*", default=[],
                        help="approximate kinds: re-ranking depths to measure (default: the plan's, then twice it)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--serve-child", nargs=4, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serve_child:  # the serving process: index folder, queries file, nprobes
        index_dir, queries_file, nprobes, k_factors = arguments.serve_child
        measured = serve_measurements(Path(index_dir), np.load(queries_file), arguments.k, json.loads(nprobes),
                                      json.loads(k_factors))
        print(json.dumps(measured))
        return

    work = arguments.work or Path(f"search-{arguments.n}")
    embed_dir, index_dir = work / "embeddings", work / f"index-{arguments.kind}"
    report = {"n": arguments.n, "dim": arguments.dim, "k": arguments.k, "queries": arguments.queries}
    if not (embed_dir / "summary.json").exists():
        started = time.perf_counter()
        generate(arguments.n, arguments.dim, embed_dir)
        report["generate_s"] = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "openalign", "index", str(embed_dir), "--out", str(index_dir), "--kind",
                    arguments.kind, "--memory-budget", arguments.memory_budget], check=True)
    report["build_s"] = time.perf_counter() - started
    report["build_peak_rss_bytes"] = _child_peak_rss()
    report["index_files_bytes"] = _folder_bytes(index_dir)
    plan = json.loads((index_dir / "index.json").read_text())["plan"]
    nprobes = arguments.nprobe or ([plan["nprobe"], 2 * plan["nprobe"], 4 * plan["nprobe"]] if plan["nlist"] else [])
    k_factors = arguments.k_factor or ([plan["k_factor"], 2 * plan["k_factor"]] if plan["k_factor"] > 1 else [])

    queries = queries_like(arguments.queries, arguments.n, arguments.dim)
    queries_file = work / "queries.npy"
    np.save(queries_file, queries)
    child = subprocess.run([sys.executable, __file__, "--k", str(arguments.k), "--serve-child", str(index_dir),
                            str(queries_file), json.dumps(nprobes), json.dumps(k_factors)], check=True,
                           capture_output=True, text=True)
    served = json.loads(child.stdout.strip().splitlines()[-1])
    exact_ids, exact_seconds = exact_top_k(embed_dir, queries, arguments.k)
    report["exact_scan_ms_per_query"] = 1000 * exact_seconds
    for run in served["runs"]:
        ids = np.asarray(run.pop("ids"))
        run["recall_at_k"] = float(np.mean([len(set(a) & set(b)) / arguments.k for a, b in zip(ids, exact_ids)]))
    report["serve"] = served
    if arguments.json:
        print(json.dumps(report, indent=1))
        return
    gigabyte = 1e9
    print(f"{arguments.n:,} x {arguments.dim} clustered vectors; {served['kind']} index {served['factory']}")
    print(f"build {report['build_s']:.0f} s, peak RSS {report['build_peak_rss_bytes'] / gigabyte:.2f} GB; files: "
          + ", ".join(f"{name} {size / gigabyte:.2f} GB" for name, size in sorted(report["index_files_bytes"].items())))
    memory = served["memory"]
    print(f"serving process: load {served['load_s']:.1f} s, VmHWM {memory['VmHWM'] / gigabyte:.2f} GB "
          f"(memory-mapped pages included), RssAnon {memory['RssAnon'] / gigabyte:.2f} GB")
    print(f"{'nprobe':>7} {'k_factor':>8} {'recall@' + str(arguments.k):>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'8 threads p50':>14} {'p99':>7} {'queries/s':>10} {'vs exact':>9}")
    for run in served["runs"]:
        print(f"{run['nprobe']:>7} {run['k_factor']:>8} {run['recall_at_k']:>10.4f} {run['single_p50_ms']:>8.2f} "
              f"{run['single_p99_ms']:>8.2f} {run['concurrent8_p50_ms']:>14.2f} {run['concurrent8_p99_ms']:>7.2f} "
              f"{run['concurrent8_queries_per_s']:>10.0f} "
              f"{report['exact_scan_ms_per_query'] / run['single_p50_ms']:>8.1f}x")
    print(f"exact scan of the float16 parts (the peer): {report['exact_scan_ms_per_query']:.2f} ms per query, batched")


if __name__ == "__main__":
    main()
