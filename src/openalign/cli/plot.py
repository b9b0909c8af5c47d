"""`openalign plot RUN_DIR`: PNG plots of a training run's metrics."""

from __future__ import annotations

import argparse

from openalign.cli._help import add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `plot` command."""
    parser = add_command(subparsers, "plot", help="plot loss, temperature, learning rate and recall of a run",
                         examples=("openalign plot runs/first", "openalign plot runs/first --out figures"))
    parser.add_argument("run_dir", help="a training run folder (holding metrics.jsonl)")
    parser.add_argument("--out", "-o", default=None, help="folder for the PNGs (default: RUN_DIR/plots)")
    parser.set_defaults(func=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    """Plot and print the written paths."""
    from openalign.train.plots import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
