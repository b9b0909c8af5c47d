"""What learning through mismatched captions costs per step: the demo's training (its data, model, batch 256,
AdamW, images cached) with the plain ALIGN loss against the same with per-pair estimates, with per-pair weighting,
and with the robust losses, each in a fresh process, alternating, --repeats times. Not a test.

    python benchmarks/robust_training.py [--steps 60] [--repeats 2] [--n 4000] [--threads 2]

Per variant: the CPU seconds per step of the whole `train` call (the measure to trust on a machine others load)
and samples/s on the wall clock after the first logging window; the best run of each counts, and each is given as
a ratio to the plain loss. The weighting runs with its warm-up at 0 and the mixture refitted every 10 steps, so
that its bookkeeping is paid on every step it can be.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = {
    "align": {},
    "align + estimates": {"loss.pair_estimates": True},
    "align + weighting": {"loss.pair_weighting": "mixture", "loss.pair_weighting_warmup": 0.0,
                          "loss.pair_mixture_every": 10},
    "rcl": {"loss.name": "rcl", "loss.fixed_temperature": True},
    "rince": {"loss.name": "rince", "loss.fixed_temperature": True},
    "rcl + weighting": {"loss.name": "rcl", "loss.fixed_temperature": True, "loss.pair_weighting": "mixture",
                        "loss.pair_weighting_warmup": 0.0, "loss.pair_mixture_every": 10},
}


def worker(args: argparse.Namespace) -> dict:
    """One variant: `args.steps` trainer steps of the demo's training on the prepared data."""
    from openalign.runtime import configure_allocator

    configure_allocator()
    import torch

    torch.set_num_threads(args.threads)
    from openalign.demo.pipeline import DemoConfig, training_config
    from openalign.train.trainer import train

    data = Path(args.data)
    # steps= makes the schedule exactly --steps long (a DemoConfig without steps fits its schedule to the time cap)
    config = DemoConfig(out_dir=str(data), steps=args.steps, image_ssl_weight=0.0, progress=False)
    with tempfile.TemporaryDirectory() as scratch:
        train_config = training_config(config, data / "filtered" / "manifest.jsonl", data / "tokenizer",
                                       data / "model_config.json", Path(scratch) / "run", args.steps, 600.0)
        train_config.run.plots = False
        train_config.loss.pair_estimates = False  # the demo keeps them on; the plain variant must not
        for key, value in VARIANTS[args.variant].items():
            train_config.set(key, value)
        started_cpu = time.process_time()
        result = train(train_config)
        cpu = time.process_time() - started_cpu
        windows = [json.loads(line) for line in (Path(scratch) / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [record["samples_per_s"] for record in windows if "samples_per_s" in record]
    return {"steps": result.step, "cpu_s_per_step": cpu / result.step,
            "samples_per_s": sum(rates[1:]) / max(1, len(rates) - 1) if len(rates) > 1 else rates[0],
            "load": os.getloadavg()[0]}


def main() -> None:
    """Prepare the data once, run every variant alternately in fresh processes, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from _demo_training import prepare_data
    from openalign.runtime import omp_wait_policy

    environment = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", omp_wait_policy())}
    runs: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    with tempfile.TemporaryDirectory() as scratch:
        prepare_data(args.n, Path(scratch) / "data")
        for _ in range(args.repeats):
            for variant in args.variants:
                done = subprocess.run(
                    [sys.executable, __file__, "--worker", f"--variant={variant}", f"--data={Path(scratch) / 'data'}",
                     f"--steps={args.steps}", f"--threads={args.threads}"],
                    env=environment, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
                runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = {variant: min(results, key=lambda result: result["cpu_s_per_step"]) for variant, results in runs.items()}
    plain = best.get("align")
    print(f"the demo's training, {args.steps} steps of 256, {args.n} pairs, {args.threads} threads, "
          f"OMP_WAIT_POLICY={environment['OMP_WAIT_POLICY']}, best of {args.repeats}")
    print(f"{'variant':<20}{'CPU s/step':>12}{'samples/s':>11}{'x plain (CPU)':>15}{'load avg':>10}")
    for variant, result in best.items():
        ratio = f"{result['cpu_s_per_step'] / plain['cpu_s_per_step']:.3f}" if plain else ""
        print(f"{variant:<20}{result['cpu_s_per_step']:>12.3f}{result['samples_per_s']:>11.1f}{ratio:>15}"
              f"{result['load']:>10.1f}")


if __name__ == "__main__":
    main()
