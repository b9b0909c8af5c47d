"""Search at scale: openalign's index against FAISS's own best choices on the same N clustered vectors.

N unit vectors of dimension 640 from clusters of very different sizes and spreads (tests.vector_mixtures: sizes
falling off as 1 / rank, spreads log-uniform over 8x), written as float16 embedding parts the way `openalign
embed` does; 1,000 fresh queries from the same mixture; their exact top 10 by a scan of the parts (the oracle).

Each step runs in its own process, so that its peak memory (ru_maxrss) is its own:

1. openalign builds (`openalign index EMB --kind KIND --memory-budget B`, tuned to --target-recall): build time,
   peak RSS, files on disk, and each stage's seconds from index.json's build report.
2. openalign serves: a process that loads the index as `openalign serve` does (memory-mapped) and answers single
   queries at the tuned settings, one at a time on one thread (ids alone, as FAISS's indexes are timed, and with
   the metadata rows the server returns), then from 8 threads at once (p50 / p99, queries a second); recall@10
   against the exact scan; VmHWM (memory-mapped pages included: the page cache can drop
   those) and RssAnon (its private memory); then the same at neighbouring nprobe / k_factor (the table a user
   chooses from).
3. FAISS's own choices, built with faiss directly from the same parts and sample (index strings as autofaiss
   would pick them, or as FAISS's guidelines recommend for this size: IVF + 4-bit fast-scan PQ + re-ranking,
   OPQ + IVF with an HNSW coarse quantiser + PQ, HNSW over all vectors), each swept over its search parameters.
   The comparison: the best recall each reaches at a p50 no higher than openalign's.

    python benchmarks/search.py --n 1000000 --work /data/bench-1m
    python benchmarks/search.py --n 10000000 --work /data/bench-10m --kinds auto --peers
    python benchmarks/search.py --n 200000 --kinds auto ivfpq --queries 300      # a quick check of the script

Goal at 10M: recall@10 >= 0.95, p99 <= 50 ms on one thread, serving process peak <= 4 GB. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.vector_mixtures

from tests.vector_mixtures import VariedMixture  # noqa: E402

DIM = 640
PART_SIZE = 100_000
CLUSTER_SIZE = 2_000  # vectors per cluster on average
K = 10
OPQ_ITERATIONS = 10
PEER_BUILD_TIMEOUT_S = 2400


def mixture(n: int, dim: int) -> VariedMixture:
    return VariedMixture(dim, max(100, n // CLUSTER_SIZE), seed=0)


def generate(n: int, dim: int, out: Path) -> None:
    """The embedding folder of N mixture vectors (item i's caption is "item i")."""
    import torch

    from openalign.inference.embed import embed_to_folder

    vectors = mixture(n, dim)

    def encode(captions):
        first = int(captions[0].split()[1])  # batches are contiguous runs of items
        return torch.from_numpy(vectors.sample(len(captions), seed=[1, first]))

    items = ({"source": f"vector-{i}", "caption": f"item {i}"} for i in range(n))
    embed_to_folder(items, encode, out, kind="text", part_size=PART_SIZE, batch_size=10_000, progress=False)


def exact_top_k(embed_dir: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids by a scan of the float16 parts (FAISS's exhaustive inner products, a part at a time)."""
    from openalign.index.tuning import exact_neighbours

    return exact_neighbours(embed_dir, "text", queries, k)


def recall(ids: np.ndarray, exact_ids: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, exact_ids)]))


def memory_status() -> dict:
    """VmHWM and RssAnon of this process, in bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmHWM", "RssAnon", "RssFile"):
            values[name] = int(rest.split()[0]) * 1024
    return values


def timed_single(search, queries: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """(ids, milliseconds) of one query at a time on this thread."""
    search(queries[:10])  # first touches of the mapped pages
    ids, times = [], []
    for query in queries:
        began = time.perf_counter()
        ids.append(search(query[None])[0])
        times.append(1000 * (time.perf_counter() - began))
    return np.stack(ids), times


def timed_concurrent(search, queries: np.ndarray, threads: int = 8) -> dict:
    def one(query):
        began = time.perf_counter()
        search(query[None])
        return 1000 * (time.perf_counter() - began)

    began = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        times = list(pool.map(one, queries))
    return {"concurrent8_p50_ms": float(np.percentile(times, 50)),
            "concurrent8_p99_ms": float(np.percentile(times, 99)),
            "concurrent8_queries_per_s": len(queries) / (time.perf_counter() - began)}


def summary(times: list[float]) -> dict:
    return {"single_p50_ms": float(np.percentile(times, 50)), "single_p99_ms": float(np.percentile(times, 99))}


# -- children --------------------------------------------------------------------------------------------------


def serve_child(index_dir: Path, queries: np.ndarray, exact_ids: np.ndarray) -> dict:
    """Load as `openalign serve` does; the tuned settings single and concurrent, then the neighbouring ones."""
    import faiss

    from openalign.index.faiss_index import Index

    faiss.omp_set_num_threads(1)  # as openalign serve: one thread per query
    started = time.perf_counter()
    index = Index.load(index_dir, memory_map=True)
    result = {"load_s": time.perf_counter() - started, "kind": index.plan.kind, "factory": index.plan.factory,
              "nprobe": index.plan.nprobe, "k_factor": index.plan.k_factor, "runs": []}
    settings = [(index.plan.nprobe, index.plan.k_factor)]
    for nprobe_scale, k_factor_scale in ((1, 0.5), (1, 2), (0.5, 1), (2, 1)):
        nprobe = int(index.plan.nprobe * nprobe_scale) if index.plan.nlist else 0
        k_factor = max(1, int(index.plan.k_factor * k_factor_scale))
        if (nprobe, k_factor) not in settings and (nprobe or not index.plan.nlist) and nprobe <= index.plan.nlist:
            settings.append((nprobe, k_factor))
    for position, (nprobe, k_factor) in enumerate(settings):
        def search(batch, nprobe=nprobe, k_factor=k_factor):  # ids alone, as FAISS's own indexes are timed
            return index.search_ids(batch, K, nprobe=nprobe or None, k_factor=k_factor)[1]

        def search_with_metadata(batch, nprobe=nprobe, k_factor=k_factor):  # what the server calls
            return index.search_vectors(batch, K, nprobe=nprobe or None, k_factor=k_factor)[1]

        ids, times = timed_single(search, queries)
        run = {"nprobe": nprobe, "k_factor": k_factor, "recall_at_10": recall(ids, exact_ids), **summary(times)}
        if position == 0:
            _, with_metadata = timed_single(search_with_metadata, queries)
            run.update({f"metadata_{name}": value for name, value in summary(with_metadata).items()})
            run.update(timed_concurrent(search_with_metadata, queries))
        result["runs"].append(run)
    result["memory"] = memory_status()
    return result


def peer_build_child(embed_dir: Path, factory: str, out: Path) -> dict:
    """Build FAISS's index string directly from the parts (sample, train, add a part at a time), as autofaiss does."""
    import faiss

    from openalign.index.sources import training_sample
    from openalign.inference.embedding_folder import iter_embedding_parts, read_summary

    count = read_summary(embed_dir)["count"]
    started = time.perf_counter()
    index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    if factory.startswith("OPQ"):  # 10 rotation updates instead of 50: training 50 takes most of an hour here
        transformed = faiss.downcast_index(index)
        transformed = faiss.downcast_index(getattr(transformed, "base_index", transformed))  # inside a Refine
        faiss.downcast_VectorTransform(transformed.chain.at(0)).niter = OPQ_ITERATIONS
    if not index.is_trained:
        nlist = faiss.extract_index_ivf(index).nlist if "IVF" in factory else 0
        index.train(training_sample(embed_dir, "text", count, min(count, max(65_536, 39 * nlist))))
    trained = time.perf_counter()
    for embeddings, _ in iter_embedding_parts(embed_dir, "text"):
        index.add(np.asarray(embeddings, dtype=np.float32))
    faiss.write_index(index, str(out))
    return {"factory": factory, "train_s": trained - started, "build_s": time.perf_counter() - started,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "disk_bytes": out.stat().st_size}


def peer_search_child(path: Path, factory: str, queries: np.ndarray, exact_ids: np.ndarray, sweep: list[str]) -> dict:
    """Each parameter string of the sweep (faiss.ParameterSpace syntax): recall and single-thread latency."""
    import faiss

    faiss.omp_set_num_threads(1)
    index = faiss.read_index(str(path))
    space = faiss.ParameterSpace()
    runs = []
    for parameters in sweep:
        space.set_index_parameters(index, parameters)
        ids, times = timed_single(lambda batch: index.search(batch, K)[1], queries)
        runs.append({"parameters": parameters, "recall_at_10": recall(ids, exact_ids), **summary(times)})
    return {"factory": factory, "runs": runs, "memory": memory_status()}


def peer_choices(n: int) -> dict[str, list[str]]:
    """{index string: parameter sweep}: FAISS's recommended structures for n vectors of dimension 640 in 4 GB."""
    nlist = 2 ** round(np.log2(4 * np.sqrt(n)))  # FAISS's guideline: 4 sqrt(N) to 16 sqrt(N) lists
    probes = [nprobe for nprobe in (8, 16, 32, 64, 128, 256, 512) if nprobe <= nlist // 4]
    fast_scan = {f"IVF{nlist},PQ320x4fs,Refine(SQfp16)": [f"nprobe={p},k_factor_rf={f}" for p in probes
                                                          for f in (16, 64)]}
    opq = {f"OPQ80_640,IVF{nlist}_HNSW32,PQ80,Refine(SQfp16)": [f"nprobe={p},quantizer_efSearch={2 * p},k_factor_rf={f}"
                                                                for p in probes for f in (16, 64)]}
    hnsw = {"HNSW32": [f"efSearch={ef}" for ef in (16, 32, 64, 128, 256, 512)]}  # autofaiss's pick up to ~1M in 4 GB
    return {**fast_scan, **opq, **hnsw}


def run_child(work: Path, role: list[str], timeout_s: float | None = None) -> dict:
    """Run this script as a child in `role` (its name and arguments); its last line of output is JSON. OpenMP
    threads wait passively in every child alike: on a shared machine spinning threads steal the cores."""
    environment = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    try:
        completed = subprocess.run([sys.executable, __file__, "--work", str(work), "--child", json.dumps(role)],
                                   capture_output=True, text=True, env=environment, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"timed_out_s": timeout_s}
    if completed.returncode:
        raise SystemExit(f"{role[0]} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def child_main(arguments) -> None:
    queries = np.load(arguments.work / "queries.npy") if (arguments.work / "queries.npy").exists() else None
    exact_ids = np.load(arguments.work / "exact.npy") if (arguments.work / "exact.npy").exists() else None
    role, *rest = json.loads(arguments.child)
    if role == "serve":
        result = serve_child(Path(rest[0]), queries, exact_ids)
    elif role == "peer-build":
        result = peer_build_child(arguments.work / "embeddings", rest[0], Path(rest[1]))
    elif role == "peer-search":
        result = peer_search_child(Path(rest[1]), rest[0], queries, exact_ids, json.loads(rest[2]))
    else:  # "build": openalign index, in this process, for its own peak memory
        from openalign.cli import main

        main(rest)
        result = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print(json.dumps(result))


# -- the run ---------------------------------------------------------------------------------------------------


def measure_openalign(arguments, embed_dir: Path, kind: str) -> dict:
    index_dir = arguments.work / f"index-{kind}"
    started = time.perf_counter()
    built = run_child(arguments.work, ["build", "index", str(embed_dir), "--out", str(index_dir), "--kind", kind,
                                       "--memory-budget", arguments.memory_budget,
                                       "--target-recall", str(arguments.target_recall)])
    config = json.loads((index_dir / "index.json").read_text())
    report = {"build_s": time.perf_counter() - started, "build_peak_rss_bytes": built["peak_rss_bytes"],
              "stages": config.get("build", {}).get("stages", {}),
              "tuning": {key: value for key, value in config.get("tuning", {}).items() if key != "measured"},
              "disk_bytes": {path.name: path.stat().st_blocks * 512 for path in index_dir.iterdir() if path.is_file()}}
    report["serve"] = run_child(arguments.work, ["serve", str(index_dir)])
    return report


def measure_peer(arguments, factory: str, sweep: list[str]) -> dict:
    path = arguments.work / f"peer-{abs(hash(factory)) % 10**8}.faiss"
    built = run_child(arguments.work, ["peer-build", factory, str(path)], timeout_s=PEER_BUILD_TIMEOUT_S)
    if "timed_out_s" in built:
        return {"factory": factory, **built, "runs": []}
    searched = run_child(arguments.work, ["peer-search", factory, str(path), json.dumps(sweep)])
    path.unlink()
    return {**built, **searched}


def best_recall_within(runs: list[dict], p50_ms: float) -> float | None:
    eligible = [run["recall_at_10"] for run in runs if run["single_p50_ms"] <= p50_ms]
    return max(eligible) if eligible else None


def print_report(report: dict) -> None:
    gigabyte = 1e9
    print(f"{report['n']:,} x {report['dim']} mixture vectors, {report['queries']} fresh queries, recall@10 against "
          "an exact scan")
    for kind, measured in report["openalign"].items():
        served, tuning = measured["serve"], measured["tuning"]
        print(f"\nopenalign --kind {kind}: {served['kind']} {served['factory']}; build {measured['build_s']:.0f} s, "
              f"peak RSS {measured['build_peak_rss_bytes'] / gigabyte:.2f} GB; disk "
              + ", ".join(f"{name} {size / gigabyte:.3f} GB" for name, size in sorted(measured["disk_bytes"].items())))
        print("  stages: " + ", ".join(f"{name} {value:.1f} s" for name, value in measured["stages"].items()))
        print(f"  tuned nprobe {tuning.get('nprobe')}, k_factor {tuning.get('k_factor')}: estimated recall "
              f"{tuning.get('recall')} +- {tuning.get('recall_standard_error')} on {tuning.get('sample_size')}")
        memory = served["memory"]
        print(f"  serving: load {served['load_s']:.1f} s, VmHWM {memory['VmHWM'] / gigabyte:.2f} GB, RssAnon "
              f"{memory['RssAnon'] / gigabyte:.2f} GB")
        print(f"  {'nprobe':>6} {'k_factor':>8} {'recall@10':>9} {'p50 ms':>7} {'p99 ms':>7} {'8-thread p50':>12} "
              f"{'p99':>6} {'queries/s':>9}")
        for run in served["runs"]:
            concurrent = (f"{run['concurrent8_p50_ms']:>12.2f} {run['concurrent8_p99_ms']:>6.2f} "
                          f"{run['concurrent8_queries_per_s']:>9.0f}   with metadata: p50 "
                          f"{run['metadata_single_p50_ms']:.2f}, p99 {run['metadata_single_p99_ms']:.2f}"
                          ) if "concurrent8_p50_ms" in run else ""
            print(f"  {run['nprobe']:>6} {run['k_factor']:>8} {run['recall_at_10']:>9.4f} {run['single_p50_ms']:>7.2f} "
                  f"{run['single_p99_ms']:>7.2f} {concurrent}")
    auto = report["openalign"].get("auto")
    for peer in report.get("peers", []):
        if "timed_out_s" in peer:
            print(f"\nFAISS {peer['factory']}: not built within {peer['timed_out_s']:.0f} s")
            continue
        print(f"\nFAISS {peer['factory']}: build {peer['build_s']:.0f} s (train {peer['train_s']:.0f} s), peak RSS "
              f"{peer['peak_rss_bytes'] / gigabyte:.2f} GB, disk {peer['disk_bytes'] / gigabyte:.3f} GB")
        for run in peer["runs"]:
            print(f"  {run['parameters']:<48} recall@10 {run['recall_at_10']:.4f}  p50 {run['single_p50_ms']:.2f} ms"
                  f"  p99 {run['single_p99_ms']:.2f} ms")
        if auto:
            ours = auto["serve"]["runs"][0]
            theirs = best_recall_within(peer["runs"], ours["single_p50_ms"])
            print(f"  at openalign auto's p50 ({ours['single_p50_ms']:.2f} ms): openalign {ours['recall_at_10']:.4f}, "
                  f"this {'nothing that fast' if theirs is None else f'{theirs:.4f}'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the collection")
    parser.add_argument("--work", type=Path, help="folder for the embeddings and the indexes (default ./search-N)")
    parser.add_argument("--kinds", nargs="+", default=["auto", "ivfpq"], help="openalign --kind values to measure")
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                        help="also build and measure FAISS's own choices")
    parser.add_argument("--memory-budget", default="4GB", help="openalign index --memory-budget")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--queries", type=int, default=1000, help="fresh queries timed and checked against exact")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a JSON list: the child's role and its arguments
    arguments = parser.parse_args()
    arguments.work = arguments.work or Path(f"search-{arguments.n}")
    if arguments.child:
        child_main(arguments)
        return

    embed_dir = arguments.work / "embeddings"
    report = {"n": arguments.n, "dim": DIM, "queries": arguments.queries, "openalign": {}, "peers": []}
    if not (embed_dir / "summary.json").exists():
        started = time.perf_counter()
        generate(arguments.n, DIM, embed_dir)
        report["generate_s"] = time.perf_counter() - started
    queries = mixture(arguments.n, DIM).sample(arguments.queries, seed=2)
    np.save(arguments.work / "queries.npy", queries)
    started = time.perf_counter()
    np.save(arguments.work / "exact.npy", exact_top_k(embed_dir, queries, K))
    report["exact_scan_s"] = time.perf_counter() - started
    for kind in arguments.kinds:
        report["openalign"][kind] = measure_openalign(arguments, embed_dir, kind)
        (arguments.work / "report.json").write_text(json.dumps(report, indent=1))
    if arguments.peers:
        for factory, sweep in peer_choices(arguments.n).items():
            report["peers"].append(measure_peer(arguments, factory, sweep))
            (arguments.work / "report.json").write_text(json.dumps(report, indent=1))
    if arguments.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
