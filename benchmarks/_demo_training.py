"""`benchmarks/train.py --demo`: the demo's training, this checkout against an earlier openalign, in one run.

The data (the demo's generator and filters at --n pairs, its tokenizer and model config) is made once, by this
checkout. Then each side, in its own fresh process with the same threads, OpenMP wait policy and allocator
settings as `openalign demo` gives itself, runs the demo's step probe (`measure_step_seconds`: loading, the
decoding part of it, and the model's step) and then the trainer itself (`train.trainer.train`) for --steps
steps of the demo's TrainConfig (`demo.pipeline.training_config`: batch 256, AdamW, cosine, the image term on
128 second views unless --no-image-ssl, channels-last, fp32, images cached in memory after the first epoch).
Sides alternate, --repeats times each; the best run of each side counts.

Reported per side: samples/s of the training loop on the wall clock after its first logging window (which holds
the first steps' one-off costs; at --n 4000 an epoch is 13 steps, so later windows are mostly cached epochs),
the CPU seconds per step of the whole `train` call (the measure to trust on a machine that other processes
load: it does not count time spent waiting for a core), and the probe's seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path


def demo_worker(args: argparse.Namespace) -> dict:
    """One side: the probe and `args.steps` trainer steps on the prepared data; what they measured."""
    from openalign.runtime import configure_allocator

    configure_allocator()  # as `openalign demo` does
    import torch

    torch.set_num_threads(args.threads)
    from openalign.demo.pipeline import DemoConfig, measure_step_seconds, training_config
    from openalign.model_config import AlignConfig
    from openalign.processing.tokenizer import AlignTokenizer
    from openalign.train.trainer import train

    data = Path(args.data)
    config = DemoConfig(out_dir=str(data), image_ssl_weight=0.5 if args.image_ssl else 0.0, progress=False)
    model_config_path = data / "model_config.json"
    manifest = data / "filtered" / "manifest.jsonl"
    precision = {"precision": "fp32", "chosen_by": "an openalign without the choice"}
    if hasattr(config, "precision"):  # the demo's precision, as `openalign demo` resolves it
        from openalign.demo.training import resolve_precision

        config, precision = resolve_precision(
            dataclasses.replace(config, precision=args.precision), manifest,
            AlignConfig.from_json_file(model_config_path), model_config_path,
            AlignTokenizer.from_pretrained(data / "tokenizer"), data)

    def demo_training(run_dir: Path, steps: int):
        train_config = training_config(config, manifest, data / "tokenizer", model_config_path, run_dir, steps, 600.0)
        train_config.run.plots = False  # not training time
        # Exactly `steps` steps: the budget is a cap, never a reason to plan more steps (run.fit_steps_to_time).
        train_config.run.fit_steps_to_time = False
        return train_config

    with tempfile.TemporaryDirectory() as scratch:
        probe = measure_step_seconds(AlignConfig.from_json_file(model_config_path),
                                     demo_training(Path(scratch) / "probe", 1),
                                     AlignTokenizer.from_pretrained(data / "tokenizer"))
        run_dir = Path(scratch) / "run"
        started_cpu, started = time.process_time(), time.perf_counter()
        result = train(demo_training(run_dir, args.steps))
        cpu, wall = time.process_time() - started_cpu, time.perf_counter() - started
        windows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [0] + [record["step"] for record in windows if "samples_per_s" in record]
    rates = [record["samples_per_s"] for record in windows if "samples_per_s" in record]
    # (samples, seconds) of each logging window after the first, or of the only one.
    measured = [(config.batch_size * (steps[index + 1] - steps[index]), rate) for index, rate in enumerate(rates)]
    measured = [(samples, samples / rate) for samples, rate in (measured[1:] or measured)]
    samples_per_s = sum(samples for samples, _ in measured) / sum(seconds for _, seconds in measured)
    return {"steps": result.step, "samples_per_s": samples_per_s, "cpu_s_per_step": cpu / result.step,
            "wall_s_per_step": wall / result.step, "probe": probe, "final_loss": result.metrics.get("loss"),
            "load": os.getloadavg()[0], "precision": precision}


def baseline_source(baseline: str, into: Path) -> Path:
    """The folder to put first on PYTHONPATH for the baseline: a folder holding an openalign package (or its
    src/), or a git revision of this repository, extracted."""
    folder = Path(baseline)
    for candidate in (folder, folder / "src"):
        if (candidate / "openalign" / "__init__.py").is_file():
            return candidate.resolve()
    archive = into / "baseline.tar"
    repository = Path(__file__).resolve().parents[1]
    subprocess.run(["git", "-C", str(repository), "archive", "--format=tar", "-o", str(archive), baseline, "src"],
                   check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def prepare_data(n: int, folder: Path) -> None:
    """The demo's generated, filtered data, tokenizer and model config, made by this checkout."""
    from openalign.demo.pipeline import DemoConfig, prepare_data, train_tokenizer

    config = DemoConfig(out_dir=str(folder), n=n, heldout_n=100, seen_n=0, progress=False)
    manifest, _, _ = prepare_data(config, folder, {})
    tokenizer = train_tokenizer(config, manifest, folder / "tokenizer", {})
    config.model_config(tokenizer.vocab_size).to_json_file(folder / "model_config.json")


def demo_main(args: argparse.Namespace, script: str) -> None:
    """Prepare the data, run both sides alternately in fresh processes and print the table and ratios."""
    from openalign.runtime import ENVIRONMENT, omp_wait_policy

    current = Path(__file__).resolve().parents[1] / "src"
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        sides = {"baseline": baseline_source(args.baseline, scratch), "current": current}
        prepare_data(args.n, scratch / "data")
        # What `openalign demo` would choose here and now, given to both sides alike; the environment wins.
        environment = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", omp_wait_policy())}
        shared = ["--demo", "--worker", f"--data={scratch / 'data'}", f"--steps={args.steps}",
                  f"--threads={args.threads}", f"--precision={args.precision}"] + (
                      [] if args.image_ssl else ["--no-image-ssl"])
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for _ in range(args.repeats):
            for side, source in sides.items():
                side_environment = {**environment, "PYTHONPATH": os.pathsep.join(
                    [str(source), *filter(None, [os.environ.get("PYTHONPATH")])])}
                done = subprocess.run([sys.executable, script, *shared], env=side_environment, capture_output=True,
                                      text=True)
                if done.returncode != 0:
                    raise SystemExit(f"the {side} side ({source}) failed:\n{done.stderr[-3000:]}")
                runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    best = {side: max(results, key=lambda result: result["samples_per_s"]) for side, results in runs.items()}
    print(f"the demo's training: {args.steps} steps of 256 (image term {'on' if args.image_ssl else 'off'}), "
          f"{args.n} generated pairs, {args.threads} threads, OMP_WAIT_POLICY={environment['OMP_WAIT_POLICY']}, "
          f"allocator as the demo sets it ({' '.join(f'{key}={value}' for key, value in ENVIRONMENT.items())} "
          f"equivalent), baseline {args.baseline}")
    print(f"{'side':<10}{'samples/s':>11}{'CPU s/step':>12}{'wall s/step':>13}{'probe model':>13}"
          f"{'probe load':>12}{'load avg':>10}  precision")
    for side, result in best.items():
        precision = result["precision"]
        print(f"{side:<10}{result['samples_per_s']:>11.1f}{result['cpu_s_per_step']:>12.3f}"
              f"{result['wall_s_per_step']:>13.3f}{result['probe']['model']:>13.3f}{result['probe']['load']:>12.3f}"
              f"{result['load']:>10.1f}  {precision['precision']} ({precision['chosen_by']}"
              + "".join(f", {name} {seconds:.3f} s" for name, seconds in precision.get("seconds", {}).items())
              + ")")
    for side, results in runs.items():
        print(f"  {side} runs: " + ", ".join(f"{result['samples_per_s']:.1f} samples/s, {result['cpu_s_per_step']:.3f}"
                                             f" CPU s/step, loss {result['final_loss']:.4f}" for result in results))
    old, new = best["baseline"], best["current"]
    print(f"current / baseline: samples/s x{new['samples_per_s'] / old['samples_per_s']:.2f}, CPU per step "
          f"x{old['cpu_s_per_step'] / new['cpu_s_per_step']:.2f}, probe model step "
          f"x{old['probe']['model'] / new['probe']['model']:.2f}")
