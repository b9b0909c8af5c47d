"""`openalign data synth --out DIR --n N`: the built-in noisy coloured-shape image-text dataset."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from openalign.cli._help import add_command


def add_rendering_arguments(parser: argparse.ArgumentParser, grayscale_rate: float,
                            colour_background_rate: float) -> None:
    """--grayscale-rate and --colour-background-rate (SynthConfig's fields of those names), with these defaults;
    shared by `openalign data synth` and `openalign demo`."""
    parser.add_argument("--grayscale-rate", type=float, default=grayscale_rate,
                        help="fraction of clean training images rendered in grey, their captions naming no colour")
    parser.add_argument("--colour-background-rate", type=float, default=colour_background_rate,
                        help="fraction of clean training images drawn as grey objects on a background of a random "
                             "named colour, captioned with the shape and that colour")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command and its `synth` sub-command."""
    from openalign.data.synth import NOISE_KINDS, SynthConfig

    defaults = SynthConfig()
    examples = ("openalign data synth --out data --n 2000",
                "openalign data synth --out data --n 20000 --clean --shards --format parquet")
    parser = add_command(subparsers, "data", help="datasets: generate the synthetic image-text corpus",
                         examples=examples)
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    synth = add_command(
        actions, "synth", help="render a noisy coloured-shape image-text dataset", examples=examples,
        description="Render a noisy coloured-shape image-text dataset: train/ (noisy pairs), heldout/ (clean "
                    "pairs of colour-shape combinations never trained on), each with manifest.jsonl, captions.txt "
                    "and images/, and dataset.json. Its manifest is what `openalign tokenizer train` and "
                    "`openalign train --data.train` take.")
    synth.add_argument("--out", "-o", required=True, help="folder for train/, heldout/, shards/ and dataset.json")
    synth.add_argument("--n", type=int, required=True, help="number of training pairs")
    synth.add_argument("--heldout-n", type=int, default=None, help="number of held-out pairs (default: n / 10)")
    synth.add_argument("--seen-n", type=int, default=0,
                       help="clean pairs of training combinations on new images, written to seen/")
    synth.add_argument("--seed", type=int, default=0, help="same seed, byte-identical output")
    synth.add_argument("--image-size", type=int, default=defaults.image_size,
                       help="side of normal images in pixels")
    synth.add_argument("--heldout-pairs", type=int, default=defaults.num_heldout_pairs,
                       help="colour-shape pairs kept out of training")
    synth.add_argument("--heldout-seed", type=int, default=defaults.heldout_seed,
                       help="seed choosing the held-out pairs")
    for kind in NOISE_KINDS:
        flag = kind.replace("_", "-")
        synth.add_argument(f"--{flag}-rate", type=float, default=getattr(defaults, f"{kind}_rate"),
                           help=f"fraction of training pairs with {kind} noise")
    synth.add_argument("--clean", action="store_true", help="set every noise rate to 0")
    add_rendering_arguments(synth, defaults.grayscale_rate, defaults.colour_background_rate)
    synth.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl", help="manifest format")
    synth.add_argument("--shards", action="store_true", help="also write WebDataset shards under shards/")
    synth.add_argument("--samples-per-shard", type=int, default=1000, help="samples per shard with --shards")
    synth.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=run_synth)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_synth(args: argparse.Namespace) -> int:
    """Generate the dataset and print its summary."""
    from openalign.data.synth import NOISE_KINDS, SynthConfig, generate

    rates = {f"{kind}_rate": 0.0 if args.clean else getattr(args, f"{kind}_rate") for kind in NOISE_KINDS}
    config = SynthConfig(image_size=args.image_size, num_heldout_pairs=args.heldout_pairs,
                         heldout_seed=args.heldout_seed, grayscale_rate=args.grayscale_rate,
                         colour_background_rate=args.colour_background_rate, **rates)
    summary = generate(args.out, args.n, config, seed=args.seed, heldout_n=args.heldout_n,
                       workers=args.workers, shards=args.shards, samples_per_shard=args.samples_per_shard,
                       manifest_format=args.format, progress=not args.quiet, seen_n=args.seen_n)
    seen = f", {summary['seen_n']} seen-combination" if summary["seen_n"] else ""
    print(f"wrote {summary['n']} training{seen} and {summary['heldout_n']} held-out pairs to {args.out}")
    print(f"noise: {json.dumps(summary['noise_counts'])}")
    print(f"held-out pairs: {', '.join(f'{c} {s}' for c, s in summary['heldout_pairs'])}")
    print(f"suggested filter: {json.dumps(summary['suggested_filter'])}")
    manifest = Path(args.out) / summary["manifests"]["train"]
    print(f"next: openalign tokenizer train {manifest} --vocab-size 400 --out tokenizer")
    return 0
