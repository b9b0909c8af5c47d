"""`openalign filter SOURCE --out DIR`: the ALIGN paper's data filters, with a report of what each dropped.

`--similarity --model CKPT` filters by the image-text cosine of each pair under a checkpoint instead (with
`--keep-fraction`, `--min-similarity`, `--dedup-similarity`; see docs/curation.md); `--scores-from DIR`
re-thresholds the scores an earlier run saved, without a model. Scoring runs under torchrun too:

    torchrun --nproc-per-node 4 -m openalign filter shards/ --similarity --model ckpt --keep-fraction 0.3 --out kept
"""

from __future__ import annotations

import argparse

from openalign.cli._common import add_model_arguments
from openalign.cli._help import add_command

RULE_THRESHOLDS = {
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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `filter` command."""
    parser = add_command(
        subparsers, "filter", help="apply the paper's data filters, or filter by image-text similarity under a "
                                   "model, to a manifest or shards",
        description="Apply the ALIGN paper's data filters (image size and aspect, shared alt-texts, rare tokens, "
                    "caption length, near-duplicates of evaluation images) to a manifest or shards, with a report "
                    "of what each rule dropped; or, with --similarity, keep the pairs a model scores best.",
        examples=("openalign filter data/train/manifest.jsonl --min-side 48 --max-images-per-caption 10 --out filtered"
                  "   # thresholds for 64 px images",
                  "openalign filter 'data/shards/train-*.tar' --similarity -m runs/first/model --keep-fraction 0.5 "
                  "--out kept",
                  "torchrun --nproc-per-node 4 -m openalign filter 'data/shards/train-*.tar' --similarity "
                  "-m runs/first/model --keep-fraction 0.3 --out kept"))
    parser.add_argument("source", help="a manifest (.csv/.tsv/.jsonl/.parquet), shard spec, or image folder")
    parser.add_argument("--out", "-o", required=True, help="folder for the kept pairs, dropped.jsonl and reports")
    parser.add_argument("--format", dest="output", choices=("auto", "manifest", "shards"), default="auto",
                        help="what to write the kept pairs as; auto: like the source")
    add_rule_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    similarity = parser.add_argument_group("similarity", "filter by the image-text cosine under a checkpoint")
    add_similarity_arguments(similarity)
    similarity.add_argument("--similarity", action="store_true",
                            help="score every pair with --model instead of applying the rules")
    similarity.add_argument("--scores-from", default=None, metavar="DIR",
                            help="re-threshold the scores an earlier --similarity run saved in DIR (no model)")
    similarity.add_argument("--part-size", type=int, default=10_000, help="pairs per scoring part")
    similarity.add_argument("--num-workers", type=int, default=0, help="threads decoding each batch's images")
    similarity.add_argument("--label-field", default="noise",
                            help="record field with noise labels, for precision and recall")
    add_model_arguments(similarity, required=False)
    parser.set_defaults(func=run)


def add_rule_arguments(parser: argparse.ArgumentParser) -> None:
    """The paper's rule thresholds (FilterConfig's defaults), --eval-images, --no-RULE and --workers."""
    from openalign.data.filters import RULES, FilterConfig

    defaults = FilterConfig()
    for name, (kind, text) in RULE_THRESHOLDS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name),
                            help=text)
    parser.add_argument("--eval-images", default=None,
                        help="evaluation images (folder, manifest or shards): drop near-duplicates of them")
    for rule in RULES:
        parser.add_argument(f"--no-{rule.replace('_', '-')}", dest=f"no_{rule}", action="store_true",
                            help=f"switch off the {rule} rule")
    parser.add_argument("--workers", type=int, default=None, help="processes reading images (default: all)")


def rule_config(args: argparse.Namespace):
    """The FilterConfig that add_rule_arguments' flags describe."""
    from openalign.data.filters import RULES, FilterConfig

    return FilterConfig(**{name: getattr(args, name) for name in RULE_THRESHOLDS}, eval_images=args.eval_images,
                        disabled=tuple(rule for rule in RULES if getattr(args, f"no_{rule}")), workers=args.workers)


def add_similarity_arguments(parser) -> None:
    """--keep-fraction, --min-similarity, --dedup-similarity and the dedup method."""
    parser.add_argument("--keep-fraction", type=float, default=None,
                        help="keep this share of the pairs, best-scoring first, in (0, 1]")
    parser.add_argument("--min-similarity", type=float, default=None, help="keep pairs scoring at least this")
    parser.add_argument("--dedup-similarity", type=float, default=None, metavar="T",
                        help="then drop pairs whose image is within cosine T of a better-scoring kept pair's")
    parser.add_argument("--dedup-method", choices=("auto", "exact", "clusters"), default="auto",
                        help="exact FAISS search, or k-means clusters searched one by one (default: exact up to "
                             "200,000 candidates)")
    parser.add_argument("--dedup-clusters", type=int, default=None, help="k-means clusters for --dedup-method "
                        "clusters (default: one per 10,000 candidates)")


def similarity_config(args: argparse.Namespace, **fields):
    """The SimilarityConfig of add_similarity_arguments' flags, plus `fields`."""
    from openalign.curation.similarity_filter import SimilarityConfig

    return SimilarityConfig(keep_fraction=args.keep_fraction, min_similarity=args.min_similarity,
                            dedup_similarity=args.dedup_similarity, dedup_method=args.dedup_method,
                            dedup_clusters=args.dedup_clusters, **fields).validate()


def run(args: argparse.Namespace) -> int:
    """Filter by the rules or by similarity, write the outputs, print the report table."""
    from openalign.data.filters import FilterConfig, format_report, run_filter
    from openalign.errors import ConfigError

    if args.similarity or args.scores_from:
        if rule_config(args) != FilterConfig(workers=args.workers):
            raise ConfigError("the rule flags do not apply with --similarity / --scores-from: filter by the rules "
                              "first and score what they keep (or run openalign curate)")
        return run_similarity(args)
    report = run_filter(args.source, args.out, rule_config(args), output=args.output, progress=not args.quiet)
    print(format_report(report), end="")
    print(written_files(report["outputs"], args.out))
    return 0


def written_files(outputs: dict, out: str) -> str:
    """The closing line: the files a filter wrote, by name (a folder of shards as the folder and its count)."""
    from pathlib import Path

    names = []
    for value in outputs.values():
        if isinstance(value, list):
            names.append(f"{Path(value[0]).parent if value else Path(out) / 'shards'}/ ({len(value)} shards)")
        else:
            names.append(str(value))
    names += [str(Path(out) / "report.json"), str(Path(out) / "report.txt")]
    return "wrote " + ", ".join(names)


def run_similarity(args: argparse.Namespace) -> int:
    """Score on every torchrun rank (or the one process), then select and write on one."""
    from openalign.curation.report import format_similarity_report
    from openalign.curation.scores import score_corpus
    from openalign.curation.similarity_filter import filter_by_scores, load_scoring_encoders
    from openalign.distributed import barrier, destroy_distributed, init_distributed, rank_and_world_size
    from openalign.errors import ConfigError
    from openalign.runtime import configure_allocator

    config = similarity_config(args, label_field=args.label_field, part_size=args.part_size,
                               batch_size=args.batch_size, num_workers=args.num_workers, output=args.output)
    if args.scores_from is None:
        if not args.model:
            raise ConfigError("--similarity needs --model CKPT (a checkpoint folder with its processor files), "
                              "or --scores-from DIR to reuse saved scores")
        info = init_distributed()
        rank, world_size = rank_and_world_size(from_environment=True)
        try:
            configure_allocator()
            # Under torchrun each rank takes the device init_distributed chose for it (cuda:LOCAL_RANK or the CPU).
            device = info.device if world_size > 1 and args.device == "auto" else args.device
            encoders = load_scoring_encoders(args.model, device=device, dtype=args.dtype,
                                             batch_size=args.batch_size, optimize=not args.no_optimize)
            summary = score_corpus(args.source, args.out, encoders, part_size=config.part_size,
                                   batch_size=config.batch_size, rank=rank, world_size=world_size,
                                   num_workers=config.num_workers, progress=not args.quiet)
            barrier()  # rank 0 has written scores.parquet before any rank leaves the group
        finally:
            destroy_distributed()
        if summary is None:
            print(f"rank {rank} of {world_size}: scored its parts of {args.out}")
            return 0
    report = filter_by_scores(args.source, args.out, config, scores_from=args.scores_from)
    print(format_similarity_report(report), end="")
    print(written_files(report["outputs"], args.out))
    return 0
