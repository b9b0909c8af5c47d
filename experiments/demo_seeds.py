"""The demo's held-out figures as a mean and spread over seeds, for one or several configurations.

One 10-minute demo cannot tell two configurations apart: seed to seed, held-out shape moves by about +-0.06
(docs/demo.md). This runs every (configuration, seed) as its own demo at a fixed number of training steps, in
parallel processes, and prints per configuration the mean, standard deviation and range of each figure, plus
a JSON file of every run. A configuration is `NAME` or `NAME:key=value,key=value` with DemoConfig fields
(`lr=1e-3`), generator fields (`synth.count_weights=(1.0,0,0)`) and TrainConfig keys (`train.loss.x=1`);
`steps=N` sets its own step count.

    python experiments/demo_seeds.py --seeds 0 1 2                     # the default, 3 seeds, about 30 minutes
    python experiments/demo_seeds.py --device cuda --parallel 5 --steps 1034 \\
        --config base --config hn2:train.loss.hard_negative_beta=2 --json sweep.json

On CPU the default runs one demo at a time, so its step count is the one the 10-minute budget gives on this
machine (about 1,000 at the default sizes). With `--device cuda` the training runs on the GPU (TF32 off, so the
arithmetic is fp32 as on the CPU) and evaluation on the CPU, so a sweep that takes hours here takes minutes
there; the figures are those of the same number of steps, not of the same minutes. Not a test.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FIGURES = (("colour_accuracy", "colour"), ("shape_accuracy", "shape"), ("shape_only_prompt_accuracy", "shape-only"),
           ("pair_accuracy", "pair"), ("image_to_text_r5", "i->t R@5"), ("text_to_image_r5", "t->i R@5"))


def parse_config(spec: str) -> tuple[str, dict]:
    """`name:key=value,...` -> (name, {key: value}); values are Python literals where they parse."""
    name, _, body = spec.partition(":")
    settings = {}
    for item in filter(None, _split_top_level(body)):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--config {spec!r}: {item!r} is not key=value")
        try:
            settings[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            settings[key.strip()] = value
    return name, settings


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so tuples survive: a=(1,0),b=2 -> ['a=(1,0)', 'b=2']."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def demo_config(settings: dict, seed: int, steps: int | None, out_dir: str, device: str, threads: int,
                loader_workers: int):
    """The DemoConfig of one run: the settings' DemoConfig fields, synth.* and train.* overrides."""
    from openalign.demo import DemoConfig

    fields, synth, train = {}, {}, {"run.device": device}
    for key, value in settings.items():
        if key.startswith("synth."):
            synth[key[len("synth."):]] = value
        elif key.startswith("train."):
            train[key[len("train."):]] = value
        else:
            fields[key] = value
    fields.setdefault("steps", steps)
    if fields["steps"] is not None:
        fields.setdefault("minutes", 600.0)  # a cap only; the step count decides
    return DemoConfig(out_dir=out_dir, seed=seed, workers=threads, loader_workers=loader_workers, progress=False,
                      synth_overrides=synth, train_overrides=train, **fields)


def run_one(spec: dict) -> None:
    """Child process: one demo, its metrics.json in spec['out']."""
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    from openalign.demo import run_demo

    config = demo_config(spec["settings"], spec["seed"], spec["steps"], spec["out"], spec["device"],
                         spec["threads"], spec["loader_workers"])
    run_demo(config)


def launch(spec: dict, deadline: float) -> dict:
    """Run one demo in its own process, killed at `deadline`; returns a row with its figures or its error."""
    row = {"config": spec["name"], "seed": spec["seed"], "settings": spec["settings"]}
    remaining = deadline - time.monotonic()
    if remaining < 30:
        return {**row, "error": "not started: the deadline was near"}
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    with open(out / "log.txt", "w") as log:
        try:
            process = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], stdout=log,
                                     stderr=subprocess.STDOUT, env=env, timeout=remaining)
            code = process.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    row["seconds"] = round(time.monotonic() - started, 1)
    metrics_path = out / "metrics.json"
    if code != 0 or not metrics_path.is_file():
        tail = (out / "log.txt").read_text(errors="replace")[-2000:]
        return {**row, "error": f"exit {code}", "log_tail": tail}
    metrics = json.loads(metrics_path.read_text())
    row.update({key: metrics[key] for key, _ in FIGURES})
    row["seen_shape"] = metrics.get("seen_pairs", {}).get("shape_accuracy")
    row["bayes_ceiling"] = metrics.get("bayes_ceiling")  # the best retrieval any model can expect
    row["steps"] = metrics["training"]["steps"]
    return row


def summarise(rows: list[dict]) -> str:
    """A markdown table: per configuration, mean +- standard deviation (min-max) of each figure."""
    columns = [*FIGURES, ("seen_shape", "seen shape")]
    lines = ["| config | runs | steps | " + " | ".join(label for _, label in columns) + " |",
             "|---|---:|---:|" + "---:|" * len(columns)]
    for name in dict.fromkeys(row["config"] for row in rows):
        done = [row for row in rows if row["config"] == name and "error" not in row]
        if not done:
            lines.append(f"| {name} | 0 | | " + " | ".join("" for _ in columns) + " |")
            continue
        cells = []
        for key, _ in columns:
            values = [row[key] for row in done if row.get(key) is not None]
            if not values:
                cells.append("")
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} +- {spread:.3f} ({min(values):.2f}-{max(values):.2f})")
        steps = sorted({row["steps"] for row in done})
        lines.append(f"| {name} | {len(done)} | {'/'.join(map(str, steps))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=None, help="NAME[:key=value,...]; repeatable")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of every run (default: what the demo's time budget gives)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--parallel", type=int, default=1, help="demos at a time")
    parser.add_argument("--threads", type=int, default=None, help="torch threads a demo (default: cores / parallel)")
    parser.add_argument("--loader-workers", type=int, default=0, help="data-loading processes a demo")
    parser.add_argument("--out", default="demo-seeds", help="folder of the runs")
    parser.add_argument("--json", default=None, help="write every run's row here (default: OUT/runs.json)")
    parser.add_argument("--deadline-minutes", type=float, default=None,
                        help="start no run after this and stop running ones at it (default: none)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        run_one(json.loads(args.child))
        return

    configs = [parse_config(spec) for spec in (args.config or ["default"])]
    threads = args.threads or max(1, (os.cpu_count() or 2) // max(1, args.parallel))
    out = Path(args.out)
    specs = [{"name": name, "settings": settings, "seed": seed, "steps": args.steps, "device": args.device,
              "threads": threads, "loader_workers": args.loader_workers, "out": str(out / f"{name}-s{seed}")}
             for seed in args.seeds for name, settings in configs]  # seed-major: every config gets seed 0 first
    deadline = time.monotonic() + (args.deadline_minutes * 60 if args.deadline_minutes else 10**9)
    json_path = Path(args.json) if args.json else out / "runs.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def finished(row: dict) -> dict:
        rows.append(row)
        json_path.write_text(json.dumps(rows, indent=1))
        figures = " ".join(f"{label} {row[key]:.3f}" for key, label in FIGURES if key in row)
        print(f"[{time.strftime('%H:%M:%S')}] {row['config']} seed {row['seed']}: "
              f"{figures or row.get('error')} ({row.get('seconds', 0)} s)", flush=True)
        return row

    print(f"{len(specs)} runs, {args.parallel} at a time, {threads} threads each, device {args.device}", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        futures = [pool.submit(lambda spec: finished(launch(spec, deadline)), spec) for spec in specs]
        for future in futures:
            future.result()
    for row in rows:
        if "log_tail" in row:
            print(f"--- {row['config']} seed {row['seed']} failed:\n{row['log_tail']}")
    print(summarise(rows))


if __name__ == "__main__":
    main()
