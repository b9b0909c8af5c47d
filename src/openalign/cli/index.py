"""`openalign index EMBED_DIR [--out INDEX_DIR] [--kind auto|flat|pq|ivfpq] [--memory-budget 4GB]`.

An "ivfpq" index can also be built by several processes (or machines sharing the folder) in three stages:

    openalign index EMB --out IDX --kind ivfpq --stage train
    openalign index EMB --out IDX --stage shard --shard 3/8        # eight of these, in parallel
    openalign index EMB --out IDX --stage merge --shard-count 8
"""

from __future__ import annotations

import argparse
import re
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
                    "fit the memory budget, PQ with re-ranking up to 1M, IVF-PQ lists on disk beyond.",
        examples=("openalign index embeddings",
                  "openalign index emb --embed-kind image --out photos-index/image --memory-budget 4GB",
                  "openalign index EMB --out IDX --kind ivfpq --stage train   # then --stage shard, --stage merge"))
    parser.add_argument("embed_dir", help="a finished `openalign embed` folder")
    parser.add_argument("--out", "-o", help="index folder (default EMBED_DIR/index)")
    parser.add_argument("--kind", default="auto", choices=("auto", "flat", "pq", "ivfpq"),
                        help="auto: exact up to 100k vectors that fit the budget, approximate beyond")
    parser.add_argument("--memory-budget", type=parse_bytes,
                        help="most bytes the index may take in memory, e.g. 4GB (default: no limit)")
    parser.add_argument("--embed-kind", choices=("image", "text"),
                        help="which embeddings, when the folder has both (default: its only kind)")
    parser.add_argument("--stage", choices=("all", "train", "shard", "merge"), default="all",
                        help="ivfpq only: one stage of a build shared by several processes")
    parser.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                        help="with --stage shard: add the parts p with p %% N == I, e.g. 3/8 (default: 0/1)")
    parser.add_argument("--shard-count", type=int, default=1, help="with --stage merge: how many shards were built")
    parser.set_defaults(func=run)


def _shard(text: str) -> tuple[int, int]:
    try:
        shard, count = (int(value) for value in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shard such as 3/8") from None
    return shard, count


def run(args: argparse.Namespace) -> int:
    """Build and save the index; copy the embedding folder's model.json so search knows the checkpoint."""
    from openalign.index.faiss_index import build_index
    from openalign.index.ivf import add_ivf_shard, merge_ivf_shards, plan_ivf_index, train_ivf_index
    from openalign.inference.embedding_folder import copy_model_reference

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
        plan = merge_ivf_shards(out, args.shard_count)
    else:
        plan = build_index(args.embed_dir, out, kind=args.kind, memory_budget_bytes=args.memory_budget,
                           embed_kind=args.embed_kind)
    copy_model_reference(args.embed_dir, out)
    print(f"wrote {out}: {plan.kind} index ({plan.factory}) of {plan.num_vectors} x {plan.dim}, "
          f"about {plan.estimated_bytes / 1e6:.1f} MB; {plan.reason}")
    print(f'next: openalign search {out} "a red bicycle"   (or: openalign serve {out})')
    return 0
