"""`openalign tokenizer train SOURCE... --vocab-size N --out DIR`: a WordPiece vocabulary from the captions of
manifests, caption files, shards or image folders."""

from __future__ import annotations

import argparse
import sys

from openalign.cli._help import add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `tokenizer` command and its `train` sub-command."""
    examples = ("openalign tokenizer train data/train/manifest.jsonl --vocab-size 400 --out tokenizer",
                "openalign tokenizer train captions.txt 'data/shards/train-*.tar' --vocab-size 30000 --out tok")
    parser = add_command(subparsers, "tokenizer", help="train a WordPiece vocabulary on captions",
                         examples=examples)
    actions = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    train = add_command(actions, "train", help="train a BERT WordPiece vocabulary on the captions of data sources",
                        description="Train a BERT WordPiece vocabulary, as the ALIGN paper does, on the captions of "
                                    "the sources: a manifest's caption column, shards' captions, an image folder's "
                                    "sidecar captions, or a .txt file of one caption a line.",
                        examples=examples)
    train.add_argument("sources", nargs="+", metavar="SOURCE",
                       help="manifest (.jsonl/.csv/.tsv/.parquet), .txt of captions, shard spec or image folder")
    train.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    train.add_argument("--out", "-o", required=True, help="folder to write tokenizer.json, vocab.txt and configs to")
    train.add_argument("--min-frequency", type=int, default=2, help="drop merges seen fewer times")
    train.add_argument("--no-lowercase", action="store_true", help="keep case (and accents)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=run_train)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_train(args: argparse.Namespace) -> int:
    """Train and save; prints where the vocabulary went."""
    from openalign.data.sources import is_caption_file
    from openalign.data.vocabulary import train_tokenizer

    # tokenizers draws its bars on stdout, and off a terminal leaves a blank line for each.
    tokenizer = train_tokenizer(args.sources, args.vocab_size, args.out, min_frequency=args.min_frequency,
                                lowercase=not args.no_lowercase, show_progress=not args.quiet and sys.stdout.isatty())
    print(f"wrote a {tokenizer.vocab_size}-token WordPiece vocabulary to {args.out}")
    if not is_caption_file(args.sources[0]):  # pairs to train on: say how
        print(f"next: openalign train --recipe cpu-small --data.train {args.sources[0]} --data.tokenizer {args.out}")
    return 0
