"""`openalign tokenizer train CAPTIONS.txt --vocab-size N --out DIR`: a WordPiece vocabulary from captions."""

from __future__ import annotations

import argparse
import pathlib


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `tokenizer` command and its `train` sub-command."""
    parser = subparsers.add_parser("tokenizer", help="train a WordPiece vocabulary on captions")
    actions = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    train = actions.add_parser("train", help="train a BERT WordPiece vocabulary from caption files")
    train.add_argument("captions", nargs="+", help="text files, one caption a line")
    train.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    train.add_argument("--out", required=True, help="folder to write tokenizer.json, vocab.txt and configs to")
    train.add_argument("--min-frequency", type=int, default=2, help="drop merges seen fewer times (default 2)")
    train.add_argument("--no-lowercase", action="store_true", help="keep case (and accents)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=run_train)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_train(args: argparse.Namespace) -> int:
    """Train and save; prints where the vocabulary went."""
    from openalign.processing.tokenizer import train_wordpiece

    tokenizer = train_wordpiece(
        [pathlib.Path(path) for path in args.captions],
        args.vocab_size,
        args.out,
        min_frequency=args.min_frequency,
        lowercase=not args.no_lowercase,
        show_progress=not args.quiet,
    )
    print(f"wrote a {tokenizer.vocab_size}-token WordPiece vocabulary to {args.out}")
    return 0
