"""`openalign compare IMAGE... -t TEXT -t TEXT --model CKPT [--out heatmap.png] [--json]`."""

from __future__ import annotations

import argparse

from openalign.cli._common import add_model_arguments, encoders_from_arguments, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `compare` command."""
    parser = subparsers.add_parser("compare", help="image-text similarity matrix, printed and drawn as a heat map")
    parser.add_argument("images", nargs="+", help="image files (rows)")
    parser.add_argument("-t", "--text", action="append", required=True, dest="texts", help="a text (column); repeat")
    parser.add_argument("--out", default="similarity.png", help="heat-map PNG to write (default similarity.png)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Compute the matrix, draw it, print it."""
    from openalign.eval.heatmap import format_matrix, plot_similarity_heatmap, similarity_matrix

    encoders = encoders_from_arguments(args)
    matrix = similarity_matrix(encoders, args.images, args.texts)
    path = plot_similarity_heatmap(args.images, args.texts, matrix, args.out)
    if args.json:
        print_json({"images": args.images, "texts": args.texts, "similarity": matrix, "heatmap": str(path)})
    else:
        print(format_matrix(args.images, args.texts, matrix))
        print(f"\nwrote {path}")
    return 0
