"""`openalign zero-shot --model CKPT IMAGE... --labels cat dog [--labels-file F] [--templates imagenet80] [-k 5]`."""

from __future__ import annotations

import argparse

from openalign.cli._common import add_model_arguments, encoders_from_arguments, print_json
from openalign.cli._help import add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `zero-shot` command."""
    parser = add_command(
        subparsers, "zero-shot", help="classify images against labels given on the command line",
        description="Classify images against labels given on the command line: each label becomes prompts "
                    "('a photo of a {}.'), their text embeddings are averaged, and each image gets the "
                    "labels' probabilities (softmax of the cosines over the model's temperature).",
        examples=("openalign zero-shot -m runs/first/model photo.jpg --labels cat dog 'red car'",
                  "openalign zero-shot -m kakaobrain/align-base *.jpg --labels-file labels.txt "
                  "--templates imagenet80 --json"))
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--labels", nargs="+", default=[], help="class labels, e.g. --labels cat dog 'red car'")
    parser.add_argument("--labels-file", help="a file with one label a line (added after --labels)")
    parser.add_argument("--templates", default="photo",
                        help="prompt templates: imagenet80 (CLIP's 80), photo ('a photo of a {}.') or a file")
    parser.add_argument("-k", "--top-k", type=int, default=5, help="labels to show per image")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Classify and print a table (or JSON)."""
    from openalign.inference.classify import format_predictions, read_labels, zero_shot_classify

    labels = list(args.labels) + (read_labels(args.labels_file) if args.labels_file else [])
    if not labels:
        raise SystemExit("openalign zero-shot: give labels with --labels or --labels-file")
    encoders = encoders_from_arguments(args)
    rows = zero_shot_classify(encoders, args.images, labels, templates=args.templates, k=args.top_k)
    if args.json:
        print_json(rows)
    else:
        print(format_predictions(rows))
    return 0
