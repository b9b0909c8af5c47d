"""What curation buys: the demo at several shares of mismatched captions x {none, rules, similarity, oracle}.

Each cell is `openalign demo` (a library call in a process of its own) on freshly generated data with that share
of mismatched captions (a right-looking caption of another colour-shape pair; the other six noise kinds at the
generator's defaults), trained on what the curation keeps:

    none        every generated pair
    rules       the paper's rules
    similarity  the rules, then the bootstrap scorer's similarity filter (the demo's default): its training and
                scoring count in the budget
    oracle      exactly the generator's clean pairs (its noise labels): the perfect filter

Every run gets the same budget: `--budget-minutes M` of wall time for the whole demo (as the README command;
the bootstrap's training and scoring inside it), or `--steps N` training steps (load-independent: the scorer's
steps count in N; use it on a busy machine or a GPU, where minutes mean something else). Several seeds per cell;
the table gives mean +- standard deviation over seeds of held-out colour, shape (pair prompts), pair accuracy,
both R@5 (with the best possible and the fraction of it), and the similarity stage's precision and recall at
dropping mismatched captions, plus how each target of the curation issue fares. Not a test.

    python experiments/demo_experiment.py --budget-minutes 9 --seeds 0 1 2 --json curation.json --table curation.md
    python experiments/demo_experiment.py --steps 1000 --device cuda --parallel 8 --threads 1 --loader-workers 1

Runs are spread over processes as experiments/demo_seeds.py spreads them (`--parallel`, `--threads`,
`--device`); on a 2-core machine a time budget needs `--parallel 1`. Results are in docs/demo.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_seeds  # noqa: E402  (the process launcher, shared with the seed sweeps)

# Each arm: the demo's --curation and the DemoConfig settings it adds.
ARMS = {
    "none": ("none", {}),
    "rules": ("rules", {}),
    "similarity": ("similarity", {}),
    "robust-loss": ("robust", {"pair_weighting": "off"}),  # the robust loss alone, no per-pair weights
    "robust": ("robust", {}),  # the robust loss and per-pair weighting (the demo's curation "robust")
    "oracle": ("oracle", {}),
}
CURATIONS = tuple(ARMS)
# (metrics.json key, column): held-out figures, then the retrieval figures' fractions of the best possible.
FIGURES = (("colour_accuracy", "colour"), ("shape_accuracy", "shape (pair)"), ("pair_accuracy", "pair"),
           ("image_to_text_r5", "i->t R@5"), ("text_to_image_r5", "t->i R@5"))
OF_BEST = (("image_to_text_r5", "i->t R@5 of best"), ("text_to_image_r5", "t->i R@5 of best"))


def run_name(rate: float, curation: str, seed: int) -> str:
    """The folder of one run: mismatch50-similarity-s0, ..."""
    return f"mismatch{round(100 * rate):02d}-{curation}-s{seed}"


def row_of(metrics: dict, rate: float, curation: str, seed: int, seconds: float) -> dict:
    """One run's row: the figures of the table, the best possible, the curation's counts and figures."""
    best = metrics.get("bayes_ceiling") or {}
    labelled = metrics.get("curation", {})
    return {
        "mismatch_rate": rate, "curation": curation, "seed": seed, "seconds": round(seconds, 1),
        "minutes": metrics["minutes"], "steps": metrics["training"].get("steps_with_bootstrap",
                                                                          metrics["training"]["steps"]),
        "bootstrap_steps": metrics["training"].get("bootstrap_steps", 0),
        "trained_on": metrics["data"]["kept_after_filter"],
        **{key: metrics[key] for key, _ in FIGURES},
        **{f"{key}_best": best.get(key) for key, _ in OF_BEST},
        **{f"{key}_of_best": metrics.get(f"{key}_of_best") for key, _ in OF_BEST},
        "mismatch_precision": labelled.get("mismatch_precision"), "mismatch_recall": labelled.get("mismatch_recall"),
        "clean_share": labelled.get("clean_share"), "samples_per_s": metrics["training"]["samples_per_s"],
        **{f"detection_{key}": (labelled.get("detection") or {}).get(key) for key in ("roc_auc", "precision")},
        "seconds_per_step": metrics["seconds"].get("train", 0) / max(1, metrics["training"]["steps"]),
        "seconds_by_stage": metrics["seconds"],
    }


def run_cell(spec: dict, deadline: float) -> dict:
    """One demo in its own process (demo_seeds.launch); the row from its metrics.json, or its error."""
    started = time.monotonic()
    launched = demo_seeds.launch(spec, deadline)
    if "error" in launched:
        return {"mismatch_rate": spec["rate"], "curation": spec["curation"], "seed": spec["seed"], **launched}
    metrics = json.loads((Path(spec["out"]) / "metrics.json").read_text())
    return row_of(metrics, spec["rate"], spec["curation"], spec["seed"], time.monotonic() - started)


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell_figures(rows: list[dict], key: str) -> tuple[float, float] | None:
    """Mean and sd of `key` over the rows that have it."""
    values = [row[key] for row in rows if row.get(key) is not None]
    return mean_sd(values) if values else None


def format_table(rows: list[dict]) -> str:
    """Markdown: one line per (mismatch rate, curation), mean +- sd over seeds."""
    header = (["mismatched", "curation", "seeds", "steps", "trained on"] + [label for _, label in FIGURES]
              + ["best i->t / t->i R@5"] + [label for _, label in OF_BEST] + ["precision", "recall"]
              + ["estimates' AUC", "estimates' precision = recall", "s / step"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rate in sorted({row["mismatch_rate"] for row in rows}):
        for curation in CURATIONS:
            cell = [row for row in rows if row["mismatch_rate"] == rate and row["curation"] == curation
                    and "error" not in row]
            if not cell:
                continue

            def show(key: str, form: str = ".3f", cell: list = cell) -> str:
                figures = cell_figures(cell, key)
                return "" if figures is None else f"{figures[0]:{form}} +- {figures[1]:{form}}"

            best = (f"{cell_figures(cell, 'image_to_text_r5_best')[0]:.3f} / "
                    f"{cell_figures(cell, 'text_to_image_r5_best')[0]:.3f}"
                    if cell_figures(cell, "image_to_text_r5_best") else "")
            steps = sorted({row["steps"] for row in cell})
            trained_on = statistics.mean(row["trained_on"] for row in cell)
            lines.append("| " + " | ".join(
                [f"{rate:.0%}", curation, str(len(cell)), f"{min(steps)}-{max(steps)}" if len(steps) > 1
                 else str(steps[0]), f"{trained_on:.0f}"]
                + [show(key) for key, _ in FIGURES] + [best] + [show(f"{key}_of_best", ".2f") for key, _ in OF_BEST]
                + [show("mismatch_precision"), show("mismatch_recall")]
                + [show("detection_roc_auc"), show("detection_precision"), show("seconds_per_step", ".2f")]) + " |")
    return "\n".join(lines)


def target_lines(rows: list[dict]) -> list[str]:
    """How the curation issue's targets fare, from the means over seeds: at 50% mismatched, similarity >= 90% of
    the oracle's colour and t->i R@5, precision and recall >= 0.9; at 20%, within 0.02 of the oracle."""

    def mean(rate: float, curation: str, key: str) -> float | None:
        figures = cell_figures([row for row in rows if row["mismatch_rate"] == rate and row["curation"] == curation
                                and "error" not in row], key)
        return None if figures is None else figures[0]

    lines = []
    for rate, kind in ((0.5, "ratio"), (0.2, "difference")):
        for key in ("colour_accuracy", "text_to_image_r5"):
            similarity, oracle = mean(rate, "similarity", key), mean(rate, "oracle", key)
            if similarity is None or oracle is None:
                continue
            if kind == "ratio":
                met = similarity >= 0.9 * oracle
                lines.append(f"- {rate:.0%} mismatched, {key}: similarity {similarity:.3f} = "
                             f"{similarity / oracle:.0%} of the oracle's {oracle:.3f} (target >= 90%): "
                             f"{'met' if met else 'not met'}")
            else:
                met = oracle - similarity <= 0.02
                lines.append(f"- {rate:.0%} mismatched, {key}: similarity {similarity:.3f}, oracle {oracle:.3f}, "
                             f"{oracle - similarity:+.3f} below (target <= 0.02): {'met' if met else 'not met'}")
        if kind == "ratio":
            for key in ("mismatch_precision", "mismatch_recall"):
                value = mean(rate, "similarity", key)
                if value is not None:
                    lines.append(f"- {rate:.0%} mismatched, similarity stage {key.split('_')[1]} {value:.3f} "
                                 f"(target >= 0.9): {'met' if value >= 0.9 else 'not met'}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the grid (or only summarise an earlier one), print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mismatch-rates", type=float, nargs="+", default=[0.0, 0.2, 0.5])
    parser.add_argument("--curations", nargs="+", choices=CURATIONS, default=list(CURATIONS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-minutes", type=float, default=None,
                        help="wall time of each whole demo run (default: the demo's own, 9)")
    budget.add_argument("--steps", type=int, default=None,
                        help="training steps of each run instead, the bootstrap scorer's included")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a DemoConfig field (or synth.* / train.* key) for every run, e.g. n=10000")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=None, help="torch threads a run (default: cores / parallel)")
    parser.add_argument("--loader-workers", type=int, default=0, help="data-loading processes a run")
    parser.add_argument("--out", default="demo-experiment", help="folder of the runs")
    parser.add_argument("--json", default=None, help="every run's row (default: OUT/runs.json)")
    parser.add_argument("--table", default=None, help="also write the markdown table here")
    parser.add_argument("--summarise", default=None, help="only print the table of an earlier --json file")
    args = parser.parse_args(argv)
    if args.summarise:
        rows = json.loads(Path(args.summarise).read_text())
        print(format_table(rows), *target_lines(rows), sep="\n")
        return

    extra = demo_seeds.parse_config("grid:" + ",".join(args.set))[1]
    if args.budget_minutes is not None:
        extra["minutes"] = args.budget_minutes
    threads = args.threads or max(1, (os.cpu_count() or 2) // max(1, args.parallel))
    out = Path(args.out)
    def settings(rate: float, curation: str) -> dict:
        # The similarity filter keeps as many pairs as the corpus has without mismatched captions (1 - rate),
        # as a user reading the score histogram would set it, unless --set keep_fraction=... says otherwise; its
        # precision and recall then measure the scorer's ranking.
        mode, arm_settings = ARMS[curation]
        keep = {"keep_fraction": max(0.05, 1.0 - rate)} if mode == "similarity" and rate > 0 else {}
        return {**keep, **arm_settings, **extra, "mismatch_rate": rate, "curation": mode}

    specs = [{"name": run_name(rate, curation, seed), "rate": rate, "curation": curation, "seed": seed,
              "settings": settings(rate, curation), "steps": args.steps,
              "device": args.device, "threads": threads, "loader_workers": args.loader_workers,
              "out": str(out / run_name(rate, curation, seed))}
             for seed in args.seeds for rate in args.mismatch_rates for curation in args.curations]
    json_path = Path(args.json) if args.json else out / "runs.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def finished(row: dict) -> None:
        rows.append(row)
        json_path.write_text(json.dumps(rows, indent=1) + "\n")
        figures = " ".join(f"{label} {row[key]:.3f}" for key, label in FIGURES if key in row)
        print(f"[{time.strftime('%H:%M:%S')}] {row['mismatch_rate']:.0%} {row['curation']} seed {row['seed']}: "
              f"{figures or row.get('error')} ({row.get('seconds', 0)} s)", flush=True)

    budget_text = f"{args.steps} steps" if args.steps else f"{extra.get('minutes', 'the default')} minutes"
    print(f"{len(specs)} runs, {args.parallel} at a time, {threads} threads each, {budget_text} a run, "
          f"device {args.device}", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        for future in [pool.submit(lambda spec: finished(run_cell(spec, 10**12)), spec) for spec in specs]:
            future.result()
    table = format_table(rows)
    print(table, *target_lines(rows), sep="\n")
    if args.table:
        Path(args.table).write_text(table + "\n\n" + "\n".join(target_lines(rows)) + "\n")


if __name__ == "__main__":
    main()
