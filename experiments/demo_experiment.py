"""What the paper's filters buy: the demo with and without them, at several noise rates, as one table.

Each cell is one `openalign demo` run (library call, same seed, same time budget per run) on freshly generated
data; the noise rate scales every noise kind of the generator (mismatched captions, boilerplate, junk, too
short, too long, undersized and extreme-aspect images) in its default proportions, so 0.20 is the generator's
default mix. The filters remove every kind except mismatched captions, which are well-formed text and which no
rule of the paper can tell from a right caption. Not a test.

    python experiments/demo_experiment.py --minutes 3                     # the 6-run grid, about 20 minutes
    python experiments/demo_experiment.py --minutes 2 --noise-rates 0 0.5 --json grid.json

Run it with OMP_WAIT_POLICY=PASSIVE when other processes share the cores (spinning OpenMP threads make two
threads many times slower than one then). Results from this machine are in docs/demo.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

COLUMNS = (("colour_accuracy", "colour"), ("shape_accuracy", "shape (pair)"),
           ("shape_only_prompt_accuracy", "shape (shape-only)"), ("pair_accuracy", "pair"),
           ("image_to_text_r5", "i->t R@5"), ("text_to_image_r1", "t->i R@1"), ("text_to_image_r5", "t->i R@5"))


def run_grid(out_dir: Path, minutes: float, noise_rates, n: int, heldout_n: int, seed: int,
             partial_caption_rate: float, threads: int, steps: int | None = None,
             demo_overrides: dict | None = None, axis: str = "noise") -> list[dict]:
    """One demo per (noise rate, filter on/off); returns a row per run with its figures and data counts.
    With `steps`, every run trains exactly that many steps (`minutes` is then only a cap), so that runs stay
    comparable when other processes slow some of them down. `demo_overrides`: further DemoConfig fields
    (e.g. grayscale_rate) for every run."""
    from openalign.demo import DemoConfig, run_demo

    extra = dict(demo_overrides or {})
    rows = []
    for noise_rate in noise_rates:
        for use_filter in (False, True):
            rate = {"noise_rate" if axis == "noise" else "mismatch_rate": noise_rate}
            config = DemoConfig(out_dir=str(out_dir / run_name(axis, noise_rate, use_filter)), minutes=minutes, n=n,
                                heldout_n=heldout_n, seed=seed, filter=use_filter,
                                partial_caption_rate=partial_caption_rate, workers=threads, progress=False,
                                steps=steps, **rate, **extra)
            started = time.monotonic()
            metrics = run_demo(config).metrics
            row = {"axis": axis, "noise_rate": noise_rate, "filter": use_filter,
                   "noise_counts": metrics["data"]["noise_counts"], "seconds": time.monotonic() - started,
                   "train_pairs": metrics["data"]["kept_after_filter"], "steps": metrics["training"]["steps"],
                   "samples_per_s": metrics["training"]["samples_per_s"],
                   **{key: metrics[key] for key, _ in COLUMNS}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def run_name(axis: str, rate: float, use_filter: bool) -> str:
    """The folder of one run: noise20-filtered, mismatch50-unfiltered, ..."""
    return f"{axis}{round(100 * rate):02d}-{'filtered' if use_filter else 'unfiltered'}"


def reevaluate(rows: list[dict], out_dir: Path) -> list[dict]:
    """The rows with their held-out figures recomputed from the saved runs by the current evaluation code
    (for a grid that ran before a change to the evaluation); training figures are kept."""
    from openalign.demo import evaluate
    from openalign.inference.encoders import load_encoders

    updated = []
    for row in rows:
        run = out_dir / run_name(row.get("axis", "noise"), row["noise_rate"], row["filter"])
        summary = json.loads((run / "data" / "dataset.json").read_text())
        heldout = evaluate.read_rows(run / "data" / "heldout" / "manifest.jsonl")
        encoders = load_encoders(run / "model", device="cpu", batch_size=64, optimize=False)
        figures = evaluate.evaluate_split(encoders, heldout, run / "data" / "heldout", summary)
        updated.append({**row, **{key: figures[key] for key, _ in COLUMNS}})
    return updated


def format_table(rows: list[dict]) -> str:
    """The grid as a markdown table, one row per run."""
    axis = rows[0].get("axis", "noise") if rows else "noise"
    header = f"| {axis} | filters | pairs trained on | steps | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (4 + len(COLUMNS))]
    for row in rows:
        cells = [f"{row['noise_rate']:.0%}", "on" if row["filter"] else "off", str(row["train_pairs"]),
                 str(row["steps"])] + [f"{row[key]:.3f}" for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run the grid, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo-experiment", help="folder for the runs")
    parser.add_argument("--minutes", type=float, default=3.0, help="time budget of each run (whole demo)")
    parser.add_argument("--noise-rates", type=float, nargs="+", default=[0.0, 0.2, 0.5])
    parser.add_argument("--axis", choices=("noise", "mismatch"), default="noise",
                        help="what --noise-rates set: the share of all seven noise kinds in their default "
                             "proportions (noise), or of mismatched captions alone, the other kinds at the "
                             "generator's defaults (mismatch)")
    parser.add_argument("--n", type=int, default=12_000, help="training pairs generated per run")
    parser.add_argument("--heldout-n", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--partial-caption-rate", type=float, default=0.0)
    parser.add_argument("--grayscale-rate", type=float, default=None,
                        help="share of clean training images in grey (default: the demo's)")
    parser.add_argument("--colour-background-rate", type=float, default=None,
                        help="share of clean training images with grey objects on a coloured background "
                             "(default: the demo's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None,
                        help="train exactly this many steps of 256 per run (--minutes becomes a cap)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--reevaluate", default=None,
                        help="instead of training, re-evaluate the runs under --out listed in this JSON file")
    args = parser.parse_args()
    from openalign.runtime import configure_allocator, set_omp_wait_policy

    set_omp_wait_policy()  # as `openalign demo` chooses it, before torch loads below
    configure_allocator()
    if args.reevaluate:
        rows = reevaluate(json.loads(Path(args.reevaluate).read_text()), Path(args.out))
    else:
        rows = run_grid(Path(args.out), args.minutes, args.noise_rates, args.n, args.heldout_n, args.seed,
                        args.partial_caption_rate, args.threads, args.steps,
                        {name: getattr(args, name) for name in ("grayscale_rate", "colour_background_rate")
                         if getattr(args, name) is not None}, axis=args.axis)
    print()
    budget = f"{args.steps} steps of 256" if args.steps else f"{args.minutes:g} minutes (whole demo)"
    if not args.reevaluate:
        print(f"{budget} per run, {args.n} pairs generated, seed {args.seed}, "
              f"partial captions {args.partial_caption_rate:g}")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
