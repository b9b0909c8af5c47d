"""`openalign index EMBED_DIR [--out INDEX_DIR] [--kind auto|flat|pq|ivfpq] [--memory-budget 4GB]`."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from openalign.cli._common import reports_errors

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
         "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'4GB', '512MiB', '1e9' -> a number of bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 4GB, 512MiB or 1e9")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `index` command."""
    parser = subparsers.add_parser("index", help="build a FAISS index over an embedding folder")
    parser.add_argument("embed_dir", help="a finished `openalign embed` folder")
    parser.add_argument("--out", "-o", help="index folder (default EMBED_DIR/index)")
    parser.add_argument("--kind", default="auto", choices=("auto", "flat", "pq", "ivfpq"),
                        help="auto: exact up to 100k vectors that fit the budget, approximate beyond")
    parser.add_argument("--memory-budget", type=parse_bytes, help="most bytes the index may take, e.g. 4GB")
    parser.add_argument("--embed-kind", choices=("image", "text"), help="which embeddings, when the folder has both")
    parser.set_defaults(func=run)


@reports_errors("index")
def run(args: argparse.Namespace) -> int:
    """Build and save the index; copy the embedding folder's model.json so search knows the checkpoint."""
    from openalign.index.faiss_index import build_index
    from openalign.inference.embedding_folder import copy_model_reference

    out = Path(args.out) if args.out else Path(args.embed_dir) / "index"
    plan = build_index(args.embed_dir, out, kind=args.kind, memory_budget_bytes=args.memory_budget,
                       embed_kind=args.embed_kind)
    copy_model_reference(args.embed_dir, out)
    print(f"wrote {out}: {plan.kind} index ({plan.factory}) of {plan.num_vectors} x {plan.dim}, "
          f"about {plan.estimated_bytes / 1e6:.1f} MB; {plan.reason}")
    return 0
