"""`openalign demo [--out DIR] [--minutes M] [--curation none|rules|similarity|robust|oracle] [--noise-rate R]
[--mismatch-rate R] [--n N] [--seed S]`: generate, curate, tokenize, train and evaluate a small ALIGN from scratch
in minutes on a CPU."""

from __future__ import annotations

import argparse

from openalign.cli._help import add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `demo` command."""
    from openalign.cli.data import add_rendering_arguments
    from openalign.demo.curation import CURATIONS
    from openalign.demo.pipeline import IMAGE_SSL_MIN_STEPS, IMAGE_SSL_WEIGHT, PRECISIONS, DemoConfig
    from openalign.train.config import DataSection

    defaults = DemoConfig()
    parser = add_command(
        subparsers, "demo", help="train a small ALIGN on a generated noisy dataset and report held-out figures",
        description="Generate a noisy image-text dataset, filter it, train a tokenizer and a small ALIGN from "
                    "scratch within --minutes, and evaluate it on colour-shape combinations never seen in "
                    "training; model/, plots, a heat map and report.md go to --out.",
        examples=("openalign demo", "openalign demo --minutes 3 --out quick-demo", "openalign demo --no-filter"))
    parser.add_argument("--out", default=defaults.out_dir, help=f"output folder (default {defaults.out_dir})")
    parser.add_argument("--minutes", type=float, default=defaults.minutes,
                        help=f"wall-time budget of the whole command (default {defaults.minutes:g})")
    parser.add_argument("--curation", choices=CURATIONS, default=defaults.curation,
                        help="which generated pairs to train on, and how: none (all), rules (the paper's filters), "
                             "similarity (the rules, then a bootstrap scorer's similarity filter; its training and "
                             "scoring count in --minutes), robust (the rules, then one run in one schedule, "
                             "each pair's loss weighted by the run's own estimate that it is clean) or oracle "
                             "(exactly the generator's clean pairs: the perfect filter, a yardstick) (default "
                             f"{defaults.curation})")
    parser.add_argument("--robust-loss", choices=("align", "rcl", "rince"), default=defaults.robust_loss,
                        help=f"the loss of --curation robust (default {defaults.robust_loss})")
    parser.add_argument("--pair-weighting", choices=("mixture", "off"), default=defaults.pair_weighting,
                        help="per-pair weights of --curation robust: mixture (each pair's clean probability "
                             f"under a two-component mixture over the run's estimates) or off (default "
                             f"{defaults.pair_weighting})")
    parser.add_argument("--no-filter", action="store_true", help="the same as --curation none")
    parser.add_argument("--bootstrap-share", type=float, default=defaults.bootstrap_share,
                        help="share of the training the bootstrap scorer takes (of --steps, or of the time left "
                             f"once scoring is paid for) (default {defaults.bootstrap_share})")
    parser.add_argument("--curation-rounds", type=int, default=defaults.curation_rounds,
                        help=f"bootstrap rounds (default {defaults.curation_rounds})")
    parser.add_argument("--keep-fraction", type=float, default=defaults.keep_fraction,
                        help="keep this share of the filtered pairs, best-scoring first (default: "
                             f"{defaults.keep_fraction})")
    parser.add_argument("--min-similarity", type=float, default=defaults.min_similarity,
                        help=f"keep pairs scoring at least this cosine (default: {defaults.min_similarity})")
    parser.add_argument("--noise-rate", type=float, default=None,
                        help="fraction of noisy training pairs, all noise kinds in the generator's proportions "
                             "(default: the generator's own, 0.20)")
    parser.add_argument("--mismatch-rate", type=float, default=None,
                        help="fraction of captions describing another colour-shape pair (applied after "
                             "--noise-rate)")
    parser.add_argument("--partial-caption-rate", type=float, default=defaults.partial_caption_rate,
                        help="fraction of clean captions naming only the colour or only the shape "
                             f"(default {defaults.partial_caption_rate:g})")
    add_rendering_arguments(parser, defaults.grayscale_rate, defaults.colour_background_rate)
    parser.add_argument("--n", type=int, default=defaults.n, help=f"training pairs (default {defaults.n})")
    parser.add_argument("--heldout-n", type=int, default=defaults.heldout_n,
                        help=f"held-out pairs (default {defaults.heldout_n})")
    parser.add_argument("--seen-n", type=int, default=defaults.seen_n,
                        help="new images of training combinations scored beside the held-out ones, to show what "
                             f"composition costs (default {defaults.seen_n}; 0: none)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train exactly this many steps (still capped by --minutes); default: as many as fit")
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                        help="training precision: auto (bfloat16 autocast where the CPU has native bfloat16 and a "
                             "step measured faster in it, else fp32), fp32 or bf16 (default auto)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help=f"training batch (default {defaults.batch_size})")
    parser.add_argument("--image-ssl-weight", type=float, default=defaults.image_ssl_weight,
                        help="weight of the label-free image term beside the contrastive loss (loss.image_ssl_weight:"
                             " each image against a colour-scrambled view of itself; 0: off; default: "
                             f"{IMAGE_SSL_WEIGHT} in runs of at least {IMAGE_SSL_MIN_STEPS} steps, off in shorter "
                             "ones)")
    parser.add_argument("--image-ssl-images", type=int, default=defaults.image_ssl_images,
                        help="images per batch that get a second view for that term (0: all; default: half the "
                             "batch)")
    parser.add_argument("--image-ssl-warmup", type=float, default=defaults.image_ssl_warmup,
                        help="fraction of the training steps over which that term's weight rises from 0 "
                             f"(default {defaults.image_ssl_warmup})")
    data = DataSection()
    parser.add_argument("--group-by", choices=["colour", "shape", "none"], default="none",
                        help="hard-negative batches (data.group_by): runs of --group-size pairs sharing this "
                             "attribute (default: plain shuffles)")
    parser.add_argument("--group-size", type=int, default=data.group_size,
                        help=f"rows per run with --group-by (default {data.group_size})")
    parser.add_argument("--group-fraction", type=float, default=data.group_fraction,
                        help="share of the rows that come in runs with --group-by; the rest are shuffled singly "
                             f"(default {data.group_fraction})")
    parser.add_argument("--group-from-epoch", type=int, default=data.group_from_epoch,
                        help="plain shuffles before this epoch, grouped ones from it on "
                             f"(default {data.group_from_epoch})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="data and training seed")
    parser.add_argument("--threads", type=int, default=defaults.workers,
                        help=f"CPU threads and data worker processes (default {defaults.workers})")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print where its outputs are."""
    from openalign.runtime import configure_allocator, set_omp_wait_policy

    set_omp_wait_policy()  # before torch loads, below
    configure_allocator()
    from openalign.demo.pipeline import DemoConfig, run_demo

    config = DemoConfig(
        out_dir=args.out, minutes=args.minutes, n=args.n, heldout_n=args.heldout_n, seen_n=args.seen_n,
        seed=args.seed,
        curation="none" if args.no_filter else args.curation, bootstrap_share=args.bootstrap_share,
        curation_rounds=args.curation_rounds, robust_loss=args.robust_loss, pair_weighting=args.pair_weighting,
        keep_fraction=args.keep_fraction, min_similarity=args.min_similarity,
        noise_rate=args.noise_rate, mismatch_rate=args.mismatch_rate,
        partial_caption_rate=args.partial_caption_rate, grayscale_rate=args.grayscale_rate,
        colour_background_rate=args.colour_background_rate,
        workers=args.threads, progress=not args.quiet,
        steps=args.steps, batch_size=args.batch_size, precision=args.precision, image_ssl_weight=args.image_ssl_weight,
        image_ssl_images=args.image_ssl_images, image_ssl_warmup=args.image_ssl_warmup,
        train_overrides={} if args.group_by == "none" else {
            "data.group_by": args.group_by, "data.group_size": args.group_size,
            "data.group_fraction": args.group_fraction, "data.group_from_epoch": args.group_from_epoch},
    )
    result = run_demo(config)
    metrics = result.metrics
    print()
    print(result.files["report"].read_text())
    print(f"finished in {metrics['minutes']:.2f} minutes; outputs in {result.out_dir}:")
    for name in ("model", "plots", "heatmap", "report", "metrics"):
        print(f"  {name:8s} {result.files[name]}")
    return 0
