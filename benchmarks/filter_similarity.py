"""Similarity filtering at scale: items/s and peak resident memory of `openalign filter --similarity` on
generated corpora of growing size, against `embed --kind both` on the same pairs (its peer: scoring is that
embedding plus the scores, the selection and the writing of the kept pairs).

    python benchmarks/filter_similarity.py [--sizes 10000 100000] [--keep-fraction 0.5] [--dedup 0.95] [--json]

Each size gets a corpus from the built-in generator (64 px, its default noise), and a random-weight tiny model
(the `tiny` preset, a WordPiece vocabulary trained on the captions). Every measured run is a fresh process, so
its peak resident set (ru_maxrss) is its own: memory that stays flat from 10k to 100k pairs is what "streams"
means. Not a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def child(arguments: argparse.Namespace) -> None:
    """One measured run in this process; prints {"seconds", "peak_rss_mib", ...} as JSON."""
    from openalign.runtime import configure_allocator

    configure_allocator()
    started = time.perf_counter()
    result: dict = {}
    if arguments.child == "filter":
        from openalign.curation.similarity_filter import SimilarityConfig, run_similarity_filter

        config = SimilarityConfig(keep_fraction=arguments.keep_fraction, dedup_similarity=arguments.dedup,
                                  batch_size=arguments.batch_size, num_workers=arguments.num_workers)
        report = run_similarity_filter(arguments.source, arguments.out, arguments.model, config, device="cpu",
                                       batch_size=arguments.batch_size)
        result = {"scored": report["scored"], "kept": report["kept"]}
    else:
        from openalign.curation.scores import pair_items
        from openalign.inference.embed import embed_to_folder
        from openalign.inference.encoders import load_encoders

        encoders = load_encoders(arguments.model, device="cpu", batch_size=arguments.batch_size)
        summary = embed_to_folder(pair_items(arguments.source),
                                  {"image": encoders.encode_loaded_images, "text": encoders.encode_texts},
                                  arguments.out, kind="both", batch_size=arguments.batch_size,
                                  num_workers=arguments.num_workers, progress=False)
        result = {"scored": summary["count"]}
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps(result))


def measure(kind: str, source: Path, model: Path, out: Path, arguments: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--source", str(source), "--model", str(model),
               "--out", str(out), "--keep-fraction", str(arguments.keep_fraction), "--batch-size",
               str(arguments.batch_size), "--num-workers", str(arguments.num_workers)]
    if arguments.dedup is not None:
        command += ["--dedup", str(arguments.dedup)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="pairs per corpus")
    parser.add_argument("--keep-fraction", type=float, default=0.5)
    parser.add_argument("--dedup", type=float, default=None, help="also deduplicate at this image cosine")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per forward")
    parser.add_argument("--num-workers", type=int, default=2, help="threads decoding each batch's images")
    parser.add_argument("--work-dir", default=None, help="where corpora go (default: a temporary folder)")
    parser.add_argument("--no-peer", action="store_true", help="skip the embed --kind both runs")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    for name in ("--child", "--source", "--model", "--out"):  # the measured process's own arguments
        parser.add_argument(name, default=None, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        child(arguments)
        return

    from embed import write_checkpoint
    from openalign.data.sources import iter_records
    from openalign.data.synth import generate

    with tempfile.TemporaryDirectory(dir=arguments.work_dir) as work:
        work = Path(work)
        results = []
        for size in arguments.sizes:
            corpus = work / f"corpus-{size}"
            started = time.perf_counter()
            generate(corpus, size, seed=0, heldout_n=0)
            generated = time.perf_counter() - started
            source = corpus / "train" / "manifest.jsonl"
            model = work / f"model-{size}"
            captions = [record.caption for _, record in zip(range(5000), iter_records(source))]
            write_checkpoint(model, "tiny", captions)
            row = {"pairs": size, "generate_s": round(generated, 1),
                   "filter": measure("filter", source, model, work / f"filtered-{size}", arguments)}
            if not arguments.no_peer:
                row["embed"] = measure("embed", source, model, work / f"embedded-{size}", arguments)
            results.append(row)
            print(_line(row), flush=True)
    first = results[0]["filter"]["peak_rss_mib"]
    for row in results[1:]:
        print(f"peak RSS at {row['pairs']:,} pairs / at {results[0]['pairs']:,}: "
              f"{row['filter']['peak_rss_mib'] / first:.2f}x")
    if arguments.json:
        print(json.dumps(results, indent=1))


def _line(row: dict) -> str:
    filtered = row["filter"]
    text = (f"{row['pairs']:>8,} pairs: filter {row['pairs'] / filtered['seconds']:7.1f} pairs/s, "
            f"peak RSS {filtered['peak_rss_mib']:7.1f} MiB, kept {filtered['kept']:,}")
    if "embed" in row:
        embedded = row["embed"]
        ratio = filtered["seconds"] / embedded["seconds"]
        text += (f" | embed --kind both {row['pairs'] / embedded['seconds']:7.1f} pairs/s, peak RSS "
                 f"{embedded['peak_rss_mib']:7.1f} MiB | filter / embed time {ratio:.2f}x")
    return text


if __name__ == "__main__":
    main()
