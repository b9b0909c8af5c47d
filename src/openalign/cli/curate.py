"""`openalign curate SOURCE --out DIR --keep-fraction F`: rules, a bootstrap model trained on what they keep,
similarity scores from it, and the final training on the pairs it keeps (openalign.curation.bootstrap).
Rerun the same command to resume after a kill; finished stages are not redone."""

from __future__ import annotations

import argparse

from openalign.cli._help import add_command
from openalign.cli.filter import add_rule_arguments, add_similarity_arguments, rule_config, similarity_config


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `curate` command."""
    parser = add_command(
        subparsers, "curate", help="rules -> bootstrap model -> similarity scores -> keep -> train again, resumable",
        description="Curate a noisy corpus: the paper's rules, a bootstrap model trained on what they keep, its "
                    "image-text similarity scores, keep the best, and train again; every stage in one folder, "
                    "resumable. Training settings: defaults < --recipe < --config < --set, for every training run.",
        examples=("openalign curate data/train/manifest.jsonl --recipe cpu-small --min-side 48 "
                  "--max-images-per-caption 10 --keep-fraction 0.7 --out curated   # rules for 64 px images",
                  "openalign curate 'data/shards/train-*.tar' --config run.yaml --no-rules --rounds 2 "
                  "--keep-fraction 0.5 --out curated"))
    parser.add_argument("source", help="a manifest (.csv/.tsv/.jsonl/.parquet) or shard spec")
    parser.add_argument("--out", "-o", required=True, help="folder for every stage (rerun the same command to resume)")
    training = parser.add_argument_group("training")
    training.add_argument("--config", default=None, help="a YAML or TOML training config for every run")
    training.add_argument("--recipe", default=None, help="a named recipe to start from (e.g. cpu-small)")
    training.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                          help="override one training field in every run (repeatable)")
    training.add_argument("--bootstrap-steps", type=int, default=500, help="steps of each bootstrap run")
    training.add_argument("--bootstrap-minutes", type=float, default=None, help="time limit of each bootstrap run")
    training.add_argument("--steps", type=int, default=1000, help="steps of the final run")
    training.add_argument("--minutes", type=float, default=None, help="time limit of the final run")
    training.add_argument("--rounds", type=int, default=1, help="bootstrap rounds: train, score, keep")
    training.add_argument("--start-from", choices=("bootstrap", "scratch"), default="bootstrap",
                          help="each run after the first starts from the previous run's weights or from scratch")
    training.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: train a WordPiece "
                          "vocabulary on the captions the rules keep)")
    training.add_argument("--vocab-size", type=int, default=1000, help="size of that vocabulary")
    similarity = parser.add_argument_group("similarity", "how each round keeps pairs")
    add_similarity_arguments(similarity)
    similarity.add_argument("--label-field", default="noise", help="record field with noise labels, for the "
                            "report's precision and recall")
    similarity.add_argument("--device", default="auto", help="device that scores (auto, cpu, cuda, ...)")
    similarity.add_argument("--allow-weak-scorer", action="store_true",
                            help="train on what a scorer kept even when it tells pairs from shuffled captions no "
                                 "better than chance (refused otherwise: its kept pairs are about a random draw)")
    rules = parser.add_argument_group("rules", "the paper's filters, applied first")
    rules.add_argument("--no-rules", action="store_true", help="skip the rules: score the source as it is")
    add_rule_arguments(rules)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the CurateConfig, run or resume it, print the stage table."""
    from openalign.curation.bootstrap import CurateConfig, curate, format_curate_report
    from openalign.train.config import parse_override

    config = CurateConfig(
        source=args.source, out_dir=args.out,
        similarity=similarity_config(args, label_field=args.label_field, output="auto"),
        rules=None if args.no_rules else rule_config(args), train_config=args.config, recipe=args.recipe,
        train_overrides=dict(parse_override(text) for text in args.set), tokenizer=args.tokenizer,
        vocab_size=args.vocab_size, bootstrap_steps=args.bootstrap_steps, bootstrap_minutes=args.bootstrap_minutes,
        steps=args.steps, minutes=args.minutes, rounds=args.rounds, start_from=args.start_from, device=args.device,
        progress=not args.quiet, allow_weak_scorer=args.allow_weak_scorer,
    )
    report = curate(config)
    print(format_curate_report(report), end="")
    print(f"outputs in {args.out}: one folder per stage, report.json, report.txt; model {report['model']}")
    return 0
