"""The GPU benchmark in one command: inference, a training step and embedding from disk, openalign against
transformers on the same device, with peak memory; a JSON and a Markdown table.

    python benchmarks/gpu.py [--out gpu-benchmark/] [--device cuda] [--preset align-base]
    python benchmarks/gpu.py --device cpu --quick      # the CPU smoke run the tests make

It runs the three benchmark scripts beside it, each configuration in fresh processes as they do:

- inference (benchmarks/inference.py): align-base image and text towers, openalign's
  `optimize_for_inference` against transformers as shipped and tuned by hand, float32, TF32 (CUDA) and
  bfloat16, eager and compiled (`--compile`: inductor; on CUDA the image tower replays as a CUDA graph);
  ms/item, GFLOP/s against a matmul peak measured in the same process, accuracy against transformers' fp32,
  peak CUDA memory (peak RSS on a CPU);
- a training step (benchmarks/train.py): efficientnet-b0+bert-mini at 128 px, batch 16 (the CPU target's
  configuration) and the same at `--train-batch` (default 256), fp32 and bf16 autocast, samples/s and peak memory;
- embedding from disk (benchmarks/embed.py): JPEG files and a caption file through `embed`'s pipeline, the
  optimised model, the plain model, transformers' model in the same pipeline, and no model (the pipeline's own
  ceiling), images/s and texts/s.

Everything lands in --out: one JSON per part, `gpu.json` (all of it, with the device's name and the versions)
and `gpu.md` (the tables). Without a CUDA device, `--device cuda` stops with a message; `--device cpu` runs
the same on the CPU (with `--quick`, tiny sizes: a test that the command works, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(command: list[str], log: list[dict]) -> str:
    """Run one benchmark script; its stdout. The command, its seconds and its return code go to `log`."""
    started = time.monotonic()
    completed = subprocess.run([sys.executable, *command], stdout=subprocess.PIPE, text=True)
    log.append({"command": " ".join(command), "seconds": round(time.monotonic() - started, 1),
                "returncode": completed.returncode})
    if completed.returncode != 0:
        raise SystemExit(f"benchmark failed ({completed.returncode}): {' '.join(command)}")
    return completed.stdout


def inference_runs(args) -> list[tuple[str, list[str]]]:
    """(name, arguments of benchmarks/inference.py) for each inference setting."""
    base = [str(HERE / "inference.py"), "--device", args.device, "--preset", args.preset]
    if args.quick:
        base += ["--num-images", "2", "--num-texts", "4", "--repeats", "1", "--image-batch", "2"]
    runs = [("eager", [*base, "--dtypes", ",".join(args.dtypes)])]
    if args.device.startswith("cuda"):
        runs.append(("eager-tf32", [*base, "--dtypes", "float32", "--tf32"]))
    if args.compile:
        runs.append(("compiled", [*base, "--dtypes", ",".join(args.dtypes), "--compile"]))
    return runs


def train_runs(args) -> list[tuple[str, list[str]]]:
    """(name, arguments of benchmarks/train.py): the CPU target's batch and a GPU-sized one, fp32 and bf16."""
    base = [str(HERE / "train.py"), "--device", args.device, "--preset", args.train_preset]
    if args.quick:
        base += ["--image-size", "64", "--steps", "1", "--warmup", "0"]
        sizes = (2,)
    else:
        base += ["--image-size", "128"]
        sizes = (16, args.train_batch)
    names = {"float32": "fp32", "bfloat16": "bf16"}
    return [(f"batch{size}-{names[dtype]}", [*base, "--batch-size", str(size), "--dtype", names[dtype]])
            for size in sizes for dtype in args.dtypes]


def embed_runs(args) -> list[tuple[str, list[str]]]:
    """(name, arguments of benchmarks/embed.py): float32 and bfloat16."""
    base = [str(HERE / "embed.py"), "--device", args.device, "--preset", args.embed_preset, "--json"]
    if args.quick:
        base += ["--images", "4", "--texts", "8", "--repeats", "1"]
    else:
        base += ["--images", str(args.embed_images), "--texts", str(args.embed_texts)]
    return [(dtype, [*base, "--dtype", dtype]) for dtype in args.dtypes]


def device_description(device: str) -> dict:
    """The device's name and the versions that matter, read in a fresh process."""
    code = (f"import json, torch; d = torch.device({device!r}); print(json.dumps({{'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'name': torch.cuda.get_device_name(d) if d.type == 'cuda' else "
            "__import__('platform').processor() or 'cpu', 'threads': torch.get_num_threads()}))")
    output = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=True).stdout
    return {**json.loads(output), "python": platform.python_version(), "machine": platform.machine()}


def cuda_available() -> bool:
    code = "import torch; print(torch.cuda.is_available())"
    return subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True).stdout.strip() == "True"


def markdown(report: dict) -> str:
    """The tables of gpu.md."""
    device = report["device"]
    lines = [f"# openalign benchmark on {device['name']} ({report['settings']['device']})", "",
             f"torch {device['torch']}, CUDA {device['cuda']}, Python {device['python']}; "
             f"{time.strftime('%Y-%m-%d', time.gmtime(report['started']))}; openalign / transformers ratios "
             "are the peer's time over openalign's (higher: openalign faster).", "",
             "## Inference", "",
             "| run | library | setting | tower | dtype | ms/item | GFLOP/s | % matmul peak | min cosine vs fp32 "
             "| peak memory GB |", "|" + "---|" * 10]
    for name, part in report["inference"].items():
        for row in part["rounds"][0]:
            memory = row["peak_cuda_gb"] if row.get("peak_cuda_gb") is not None else row["peak_rss_gb"]
            lines.append(f"| {name} | {row['library']} | {row['setting']} | {row['tower']} | {row['dtype']} | "
                         f"{row['seconds_per_item'] * 1e3:.2f} | {row['gflops']:.0f} | {row['percent_of_peak']:.1f} | "
                         f"{row['min_cosine']:.6f} | {memory:.2f} |")
    lines += ["", "| run | comparison | tower | dtype | ratio |", "|---|---|---|---|---|"]
    for name, part in report["inference"].items():
        for ratio in part["ratios"][0]:
            lines.append(f"| {name} | {ratio['comparison']} | {ratio['tower']} | {ratio['dtype']} | "
                         f"{ratio['ratio']:.2f}x |")
    lines += ["", "## Training step", "",
              "| run | checkpointing | openalign samples/s | transformers samples/s | speed | peak memory "
              "openalign / transformers |", "|---|---|---|---|---|---|"]
    for name, part in report["train"].items():
        by = {(row["implementation"], row["checkpointing"]): row for row in part["rows"]}
        for checkpointing, ratio in part["ratios"].items():
            lines.append(f"| {name} | {checkpointing} | {by['openalign', checkpointing]['samples_per_s']:.1f} | "
                         f"{by['transformers', checkpointing]['samples_per_s']:.1f} | {ratio['speed']:.2f}x | "
                         f"{ratio['peak_memory']:.2f}x |")
    lines += ["", "## Embedding from disk", "", "| dtype | pipeline | images/s | texts/s |", "|---|---|---|---|"]
    for name, part in report["embed"].items():
        for pipeline, row in part["rows"].items():
            lines.append(f"| {name} | {pipeline} | {row['images_per_s']:.1f} | {row['texts_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--out", default="gpu-benchmark", help="folder for the JSON and gpu.md")
    parser.add_argument("--preset", default="align-base", help="inference model (random weights)")
    parser.add_argument("--train-preset", default="efficientnet-b0+bert-mini")
    parser.add_argument("--train-batch", type=int, default=256, help="the larger training batch")
    parser.add_argument("--embed-preset", default="align-base")
    parser.add_argument("--embed-images", type=int, default=512)
    parser.add_argument("--embed-texts", type=int, default=4096)
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the compiled inference run (compiling align-base takes minutes)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, float32 only: a check that everything "
                        "runs (bfloat16 on a CPU without native kernels takes minutes even tiny)")
    args = parser.parse_args(argv)
    args.dtypes = args.dtypes.split(",")
    if args.quick:
        args.preset = args.embed_preset = "efficientnet-b0+bert-mini"
        args.compile, args.dtypes = False, ["float32"]
    if args.device.startswith("cuda") and not cuda_available():
        print("no CUDA device here: run with --device cpu (with --quick for a smoke run)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"started": time.time(), "settings": vars(args), "device": device_description(args.device),
              "inference": {}, "train": {}, "embed": {}, "log": []}
    for name, command in inference_runs(args):
        path = out / f"inference-{name}.json"
        run([*command, "--json", str(path)], report["log"])
        report["inference"][name] = json.loads(path.read_text())
    for name, command in train_runs(args):
        path = out / f"train-{name}.json"
        run([*command, "--json", str(path)], report["log"])
        report["train"][name] = json.loads(path.read_text())
    for name, command in embed_runs(args):
        report["embed"][name] = json.loads(run(command, report["log"]))
        (out / f"embed-{name}.json").write_text(json.dumps(report["embed"][name], indent=1) + "\n")
    (out / "gpu.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu.md").write_text(markdown(report))
    print(markdown(report))
    print(f"written: {out / 'gpu.json'}, {out / 'gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
