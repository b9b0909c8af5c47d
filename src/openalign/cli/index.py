"""`openalign index EMBED_DIR [--out INDEX_DIR] [--kind auto|flat|pq|ivfpq] [--memory-budget 4GB]
[--target-recall 0.95]`, and `openalign index --verify INDEX_DIR`.

An "ivfpq" index can also be built by several processes (or machines sharing the folder) in three stages:

    openalign index EMB --out IDX --kind ivfpq --stage train
    openalign index EMB --out IDX --stage shard --shard 3/8        # eight of these, in parallel
    openalign index EMB --out IDX --stage merge --shard-count 8
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

from openalign.cli._help import add_command

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
         "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'4GB', '512MiB', '1e9' -> a number of bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4GB, 512MiB or 1e9")
    size = float(match.group(1)) * UNITS[match.group(2).upper()]
    if not 1 <= size < 2**63:  # 1e400 is infinite, and int() of it a traceback
        raise argparse.ArgumentTypeError(f"{text} is not a size from 1 byte to 8 EiB")
    return int(size)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `index` command."""
    parser = add_command(
        subparsers, "index", help="build a FAISS index over an embedding folder",
        description="Build a FAISS index over a finished `openalign embed` folder: exact up to 100k vectors that "
                    "fit the memory budget, float16 vectors in inverted lists up to 1M, IVF-PQ lists on disk "
                    "beyond; its search settings are tuned on the collection to reach --target-recall.",
        examples=("openalign index embeddings",
                  "openalign index emb --embed-kind image --out photos-index/image --memory-budget 4GB",
                  "openalign index EMB --out IDX --kind ivfpq --stage train   # then --stage shard, --stage merge",
                  "openalign index --verify embeddings/index"))
    parser.add_argument("embed_dir", help="a finished `openalign embed` folder (with --verify: an index folder)")
    parser.add_argument("--out", "-o", help="index folder (default EMBED_DIR/index)")
    parser.add_argument("--kind", default="auto", choices=("auto", "flat", "ivfsq", "pq", "ivfpq"),
                        help="auto: exact up to 100k vectors that fit the budget; float16 vectors in inverted "
                             "lists (ivfsq) up to 1M; lists of 8-bit codes on disk (ivfpq) beyond")
    parser.add_argument("--memory-budget", type=parse_bytes,
                        help="most bytes the index may take in memory, e.g. 4GB (default: no limit)")
    parser.add_argument("--target-recall", type=_recall, default=0.95,
                        help="recall@10 the search settings are tuned to reach, measured on the collection's own "
                             "vectors (each query's own row left out)")
    parser.add_argument("--verify", action="store_true",
                        help="check an index folder's every byte against its files.json instead of building")
    parser.add_argument("--embed-kind", choices=("image", "text"),
                        help="which embeddings, when the folder has both (default: its only kind)")
    parser.add_argument("--stage", choices=("all", "train", "shard", "merge"), default="all",
                        help="ivfpq only: one stage of a build shared by several processes")
    parser.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                        help="with --stage shard: add the parts p with p %% N == I, e.g. 3/8 (default: 0/1)")
    parser.add_argument("--shard-count", type=int, default=1, help="with --stage merge: how many shards were built")
    parser.set_defaults(func=run)


def _recall(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a recall between 0 and 1, such as 0.95")
    return value


def _serve_folder(out: Path) -> Path:
    """The folder to serve: out, or its parent when out is the image/ or text/ half of a two-index folder."""
    halves = ("image", "text")
    if out.name in halves and all((out.parent / half / "index.json").is_file() for half in halves):
        return out.parent
    return out


def _report(plan, config: dict) -> list[str]:
    """What the build chose and measured, for the terminal."""
    tuning = config.get("tuning", {})
    lines = []
    if tuning.get("sample_size"):
        settings = (f"nprobe {plan.nprobe}, " if plan.nlist else "") + f"k_factor {plan.k_factor}"
        lines.append(f"tuned {settings}: recall@{tuning['k']} {tuning['recall']:.3f} +- "
                     f"{tuning['recall_standard_error']:.3f} on {tuning['sample_size']} of its own vectors "
                     f"(target {tuning['target_recall']}), p50 {tuning['p50_ms']:.1f} ms on one thread")
        if not tuning["reached"]:
            lines.append(f"warning: no setting reached recall {tuning['target_recall']}; the best measured is kept "
                         "(a larger --memory-budget allows a more accurate kind)")
    stages = config.get("build", {}).get("stages", {})
    if stages:
        lines.append("stages: " + ", ".join(f"{name.removesuffix('_s').replace('_', ' ')} {seconds:.1f} s"
                                            for name, seconds in stages.items()))
    return lines


def _shard(text: str) -> tuple[int, int]:
    try:
        shard, count = (int(value) for value in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shard such as 3/8") from None
    return shard, count


def run(args: argparse.Namespace) -> int:
    """Build and publish the index (or one stage of a shared build, or verify a built one)."""
    from openalign.index.faiss_index import build_index, verify_index
    from openalign.index.folder import read_index_json
    from openalign.index.ivf import add_ivf_shard, merge_ivf_shards, plan_ivf_index, train_ivf_index

    if args.verify:
        index = verify_index(args.embed_dir)
        print(f"{args.embed_dir}: every file matches its files.json; {len(index)} x {index.dim} vectors")
        return 0
    out = Path(args.out) if args.out else Path(args.embed_dir) / "index"
    if args.stage == "train":
        plan, embed_kind = plan_ivf_index(args.embed_dir, memory_budget_bytes=args.memory_budget,
                                          embed_kind=args.embed_kind)
        train_ivf_index(args.embed_dir, out, plan, embed_kind)
        print(f"trained {out}: {plan.factory}; now --stage shard --shard I/N for each I, then --stage merge")
        return 0
    if args.stage == "shard":
        print(f"wrote {add_ivf_shard(out, *args.shard)}")
        return 0
    if args.stage == "merge":
        plan = merge_ivf_shards(out, args.shard_count, target_recall=args.target_recall)
    else:
        plan = build_index(args.embed_dir, out, kind=args.kind, memory_budget_bytes=args.memory_budget,
                           embed_kind=args.embed_kind, target_recall=args.target_recall)
    print(f"wrote {out}: {plan.kind} index ({plan.factory}) of {plan.num_vectors} x {plan.dim}, "
          f"about {plan.estimated_bytes / 1e6:.1f} MB; {plan.reason}")
    for line in _report(plan, read_index_json(out)):
        print(line)
    print(f'next: openalign search {shlex.quote(str(out))} "a red bicycle"   '
          f"(or: openalign serve {shlex.quote(str(_serve_folder(out)))})")
    return 0
