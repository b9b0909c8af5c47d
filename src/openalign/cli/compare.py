"""`openalign compare IMAGE... -t TEXT -t TEXT --model CKPT [--out heatmap.png] [--json]`."""

from __future__ import annotations

import argparse

from openalign.cli._common import add_model_arguments, encoders_from_arguments, print_json
from openalign.cli._help import add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `compare` command."""
    from openalign.eval.heatmap import COLOUR_SCALES

    parser = add_command(
        subparsers, "compare", help="image-text similarity matrix, printed and drawn as a heat map",
        description="The cosine similarity of every image with every text, printed as a table and drawn as a "
                    "heat map with the images' thumbnails.",
        examples=("openalign compare red.png blue.png -t 'a red circle' -t 'a blue circle' -m runs/first/model",
                  "openalign compare *.jpg -t cat -t dog -m kakaobrain/align-base --scale cosine --out heat.png"))
    parser.add_argument("images", nargs="+", help="image files (rows)")
    parser.add_argument("-t", "--text", action="append", required=True, dest="texts", help="a text (column); repeat")
    parser.add_argument("--out", "-o", default="similarity.png", help="heat-map PNG to write")
    parser.add_argument("--scale", choices=tuple(COLOUR_SCALES), default="auto",
                        help="colour scale: auto (this matrix's range), cosine (-1 to 1) or positive (0 to 1); "
                             "a fixed one makes pictures of different models comparable")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Compute the matrix, draw it, print it."""
    from openalign.eval.heatmap import format_matrix, plot_similarity_heatmap, similarity_matrix
    from openalign.figures import check_figure_path

    check_figure_path(args.out)  # before the model loads: a mistyped extension costs nothing
    encoders = encoders_from_arguments(args)
    matrix = similarity_matrix(encoders, args.images, args.texts)
    path = plot_similarity_heatmap(args.images, args.texts, matrix, args.out, scale=args.scale)
    if args.json:
        print_json({"images": args.images, "texts": args.texts, "similarity": matrix, "heatmap": str(path)})
    else:
        print(format_matrix(args.images, args.texts, matrix))
        print(f"\nwrote {path}")
    return 0
