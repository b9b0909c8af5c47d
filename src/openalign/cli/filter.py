"""`openalign filter SOURCE --out DIR`: the ALIGN paper's data filters, with a report of what each dropped."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `filter` command."""
    from openalign.data.filters import RULES, FilterConfig

    defaults = FilterConfig()
    parser = subparsers.add_parser("filter", help="apply the paper's data filters to a manifest or shards")
    parser.add_argument("source", help="a manifest (.csv/.tsv/.jsonl/.parquet), shard spec, or image folder")
    parser.add_argument("--out", required=True, help="folder for the kept pairs, dropped.jsonl and reports")
    parser.add_argument("--output", choices=("auto", "manifest", "shards"), default="auto",
                        help="what to write the kept pairs as (default: like the source)")
    thresholds = {
        "min_side": (int, "keep images whose shorter side is over this many pixels"),
        "max_aspect": (float, "keep images whose long / short side ratio is under this"),
        "max_captions_per_image": (int, "drop images paired with more alt-texts than this"),
        "max_images_per_caption": (int, "drop alt-texts shared by more pairs than this"),
        "top_unigrams": (int, "vocabulary size in unigrams for the rare-token rule"),
        "top_bigrams": (int, "vocabulary size in bigrams for the rare-token rule"),
        "min_token_count": (int, "a vocabulary entry must occur at least this often"),
        "min_words": (int, "drop alt-texts with fewer unigrams"),
        "max_words": (int, "drop alt-texts with more unigrams"),
        "max_hamming": (int, "pHash bits within which an image is a near-duplicate of an evaluation image"),
    }
    for name, (kind, text) in thresholds.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name),
                            help=f"{text} (default {getattr(defaults, name)})")
    parser.add_argument("--eval-images", default=None,
                        help="evaluation images (folder, manifest or shards): drop near-duplicates of them")
    for rule in RULES:
        parser.add_argument(f"--no-{rule.replace('_', '-')}", dest=f"no_{rule}", action="store_true",
                            help=f"switch off the {rule} rule")
    parser.add_argument("--workers", type=int, default=None, help="processes reading images (default: all)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Filter, write the outputs, print the report table."""
    from openalign.data.filters import RULES, FilterConfig, format_report, run_filter

    config = FilterConfig(
        min_side=args.min_side, max_aspect=args.max_aspect, max_captions_per_image=args.max_captions_per_image,
        max_images_per_caption=args.max_images_per_caption, top_unigrams=args.top_unigrams,
        top_bigrams=args.top_bigrams, min_token_count=args.min_token_count, min_words=args.min_words,
        max_words=args.max_words, eval_images=args.eval_images, max_hamming=args.max_hamming,
        disabled=tuple(rule for rule in RULES if getattr(args, f"no_{rule}")), workers=args.workers,
    )
    report = run_filter(args.source, args.out, config, output=args.output, progress=not args.quiet)
    print(format_report(report), end="")
    print(f"outputs in {args.out}: {', '.join(sorted(report['outputs']))}, report.json, report.txt")
    return 0
