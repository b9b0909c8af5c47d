"""Load on `openalign serve`: a fixed number of /knn-service queries (texts from the index's own captions, and
stored vectors as embedding_input) at a fixed concurrency against 127.0.0.1, with a time limit. Prints the
count, errors and p50 / p99 latency. Not a test (tests/test_serve.py sends 400 of them).

    python benchmarks/serve_load.py INDEX_DIR                       # 2,000 queries, 8 at a time
    python benchmarks/serve_load.py INDEX_DIR --queries 5000 --concurrency 16 --model CKPT
    python benchmarks/serve_load.py INDEX_DIR --no-model             # generated vectors: embedding queries only
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from openalign.index.faiss_index import Index
from openalign.serve.load import run_load
from openalign.serve.service import load_indexes


def start_server(index_dir: str, extra: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """`openalign serve INDEX_DIR --port 0` in a subprocess; returns it and its loopback URL."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "openalign", "serve", index_dir, "--port", "0", *extra],
                                   stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (match := re.search(r"on (http://127\.0\.0\.1:\d+)", log_path.read_text(errors="replace"))):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"openalign serve did not start:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.2)
    return process, match.group(1)


def query_bodies(index: Index, modality: str, count: int, with_text: bool) -> list[dict]:
    """count bodies: captions of the indexed items as text queries (when a model is loaded), alternating with
    their stored vectors as embedding_input."""
    rows = min(len(index), 500)
    captions = [caption for caption in index.metadata.column("caption").slice(0, rows).to_pylist() if caption]
    vectors = index.stored_vectors(list(range(rows)))
    bodies = []
    for number in range(count):
        if with_text and captions and number % 2 == 0:
            query = {"text": captions[number // 2 % len(captions)]}
        else:
            query = {"embedding_input": vectors[number % rows].tolist()}
        bodies.append({**query, "modality": modality, "num_images": 10})
    return bodies


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("index", help="an index folder (or one holding image/ and text/)")
    parser.add_argument("--model", help="checkpoint, when the index names none")
    parser.add_argument("--no-model", action="store_true",
                        help="serve without a model (an index of generated vectors): embedding queries only")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=600)
    arguments = parser.parse_args()
    indexes = load_indexes(arguments.index)
    modality, index = next(iter(indexes.items()))
    extra = ["--no-model"] if arguments.no_model else ["--model", arguments.model] if arguments.model else []
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_server(arguments.index, extra, Path(folder) / "serve.log")
        try:
            bodies = query_bodies(index, modality, arguments.queries, with_text=not arguments.no_model)
            report = run_load(url, bodies, concurrency=arguments.concurrency, max_seconds=arguments.max_seconds)
        finally:
            process.terminate()
            process.wait(timeout=30)
    print(f"{arguments.queries} queries at concurrency {arguments.concurrency} against {url} ({modality} index of "
          f"{len(index):,}): {report.summary()}")
    for error in report.errors[:10]:
        print("  ", error)
    sys.exit(1 if report.errors or report.sent < arguments.queries else 0)


if __name__ == "__main__":
    main()
