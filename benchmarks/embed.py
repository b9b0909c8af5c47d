"""Embedding throughput end to end from files on disk: images/s and texts/s of `openalign embed`'s pipeline.

    python benchmarks/embed.py [--preset efficientnet-b0+bert-mini] [--images 64] [--texts 1024] [--json]

What is timed is `embed_to_folder` exactly as the command drives it: JPEG files read from a folder (decode,
EXIF, RGB, resize + crop, rescale), the model, L2-normalisation, float16 .npy + Parquet parts written; for
texts, a caption file read line by line, tokenized, length-bucketed, embedded and written. Peers measured in
the same run, same allocator settings (`configure_allocator()`, as the commands call it):

- "plain": the same pipeline on the plain AlignModel instead of its `optimize_for_inference` copy;
- "transformers": the same pipeline (openalign's decoding and preprocessing, equal to transformers' by the
  processor tests) with transformers' AlignModel loaded from the same folder doing the forward (captions padded
  to the longest of each batch, bf16 by autocast);
- "no model": the same pipeline with an encoder that returns zeros, i.e. the ceiling the reading, decoding,
  preprocessing and writing allow;
- "model alone": the optimised model's forward on pixel tensors already in memory (images) and `encode_texts`
  on captions already in memory (texts): what the pipeline would reach if reading, decoding and writing cost
  nothing; and "FLOP limit": the model's matmul and convolution FLOPs per item against a matmul peak measured
  in this process.

Decoding runs on --num-workers threads (default 2, as `openalign embed`), the next batch's while the current
one is encoded.

Weights are random (trainable_init, randomised BatchNorm), so numbers depend on the architecture only. Best
of --repeats runs each. Not a test.

Measured here with the defaults (2 shared AMD EPYC cores, other jobs running: load average 6-7, so absolute
rates are a fraction of an idle machine's; the model's bare forward ran at about 4 images/s in the same
minutes): optimized 7.8 images/s and 132 texts/s, plain 4.9 and 98 (1.60x / 1.35x), no model 556 images/s:
decoding, preprocessing and writing take under 2% of the image pipeline's time.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _measure import best_time, count_flops, matmul_peak  # noqa: E402
from _models import build_openalign  # noqa: E402
from openalign.data.sources import iter_records  # noqa: E402
from openalign.inference.embed import embed_to_folder  # noqa: E402
from openalign.inference.encoders import load_encoders  # noqa: E402
from openalign.processing.image_processor import AlignImageProcessor  # noqa: E402
from openalign.processing.processor import AlignProcessor  # noqa: E402
from openalign.processing.tokenizer import train_wordpiece  # noqa: E402
from openalign.runtime import configure_allocator  # noqa: E402

WORDS = (
    "a the of with and in on at photo picture close up portrait young old man woman child dog cat bird horse car "
    "bike boat train house street city beach mountain lake river forest park garden kitchen table chair window "
    "sky sunset night winter summer snow rain red blue green yellow black white small large running sitting"
).split()


def write_images(folder: Path, count: int, size=(400, 300), seed: int = 0) -> None:
    """count JPEGs of smooth colour gradients plus noise (photo-like file sizes, about 30-60 kB)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
    for index in range(count):
        base = rng.uniform(0, 255, 3) + rng.uniform(-0.4, 0.4, 3) * xs[..., None] + rng.uniform(-0.4, 0.4, 3) * ys[
            ..., None]
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:06d}.jpg", quality=90)


def write_captions(path: Path, count: int, seed: int = 0) -> list[str]:
    """count alt-text-like captions of 6-22 words, one a line."""
    generator = random.Random(seed)
    captions = [" ".join(generator.choices(WORDS, k=generator.randint(6, 22))) for _ in range(count)]
    path.write_text("\n".join(captions) + "\n", encoding="utf-8")
    return captions


def write_checkpoint(folder: Path, preset: str, captions: list[str]) -> None:
    """A random-weight checkpoint of the preset with a WordPiece vocabulary trained on the captions."""
    model = build_openalign(preset)
    model.save_pretrained(folder)
    image_size = model.config.vision_config.image_size
    resize = round(image_size * 346 / 289)  # align-base's resize / crop ratio
    image_processor = AlignImageProcessor(size={"height": resize, "width": resize},
                                          crop_size={"height": image_size, "width": image_size})
    tokenizer = train_wordpiece(captions, vocab_size=min(2000, model.config.text_config.vocab_size))
    AlignProcessor(tokenizer, image_processor).save_pretrained(folder)


def transformers_encoders(folder: Path, device: str, dtype: str, processor):
    """(encode images, encode texts) with transformers' AlignModel from `folder` on `device`, fed by openalign's
    processor: the peer's model in the same pipeline."""
    import transformers

    twin = transformers.AlignModel.from_pretrained(folder).eval().to(device)
    autocast = torch.bfloat16 if dtype == "bfloat16" else None

    def forward(call, **inputs):
        with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=autocast,
                                                    enabled=autocast is not None):
            output = call(**inputs)  # a tensor, or (newer transformers) an output with pooler_output
            output = getattr(output, "pooler_output", output)
            return torch.nn.functional.normalize(output.float(), dim=-1).cpu()

    def encode_images(batch):
        return forward(twin.get_image_features, pixel_values=processor.image_processor(list(batch)).to(device))

    def encode_texts(batch):
        encoded = processor.tokenizer(list(batch), padding="longest", max_length=64, truncation=True)
        return forward(twin.get_text_features, **{key: value.to(device) for key, value in encoded.items()})

    return encode_images, encode_texts


def timed_run(items, encode, kind: str, batch_size: int, num_workers: int, repeats: int) -> float:
    """Best wall time of embed_to_folder over repeats, each into a fresh folder."""
    best = float("inf")
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            embed_to_folder(items(), encode, out, kind=kind, batch_size=batch_size, num_workers=num_workers,
                            progress=False)
            best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="efficientnet-b0+bert-mini", help="model preset (random weights)")
    parser.add_argument("--images", type=int, default=64, help="JPEG files to embed")
    parser.add_argument("--texts", type=int, default=1024, help="captions to embed")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--num-workers", type=int, default=2,
                        help="decoding threads (the next batch decodes while the current one is encoded)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement (best is kept)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-transformers", dest="transformers", action="store_false",
                        help="skip the transformers row")
    arguments = parser.parse_args()
    configure_allocator()

    with tempfile.TemporaryDirectory() as workspace:
        workspace = Path(workspace)
        captions = write_captions(workspace / "captions.txt", arguments.texts)
        write_images(workspace / "images", arguments.images)
        write_checkpoint(workspace / "checkpoint", arguments.preset, captions)

        def image_items():
            return iter_records(workspace / "images")

        def text_items():
            return iter_records(workspace / "captions.txt")

        results = {"preset": arguments.preset, "dtype": arguments.dtype, "images": arguments.images,
                   "texts": arguments.texts, "threads": torch.get_num_threads(), "device": arguments.device,
                   "rows": {}}
        for name, optimize in (("optimized", True), ("plain", False)):
            encoders = load_encoders(workspace / "checkpoint", device=arguments.device, dtype=arguments.dtype,
                                     optimize=optimize)
            # Warm-up outside the timing: first-touch allocations and one-off kernel selection.
            encoders.encode_images(sorted((workspace / "images").iterdir())[: encoders.image_batch_size])
            encoders.encode_texts(captions[: encoders.text_batch_size])
            image_seconds = timed_run(image_items, encoders.encode_loaded_images, "image", encoders.image_batch_size,
                                      arguments.num_workers, arguments.repeats)
            text_seconds = timed_run(text_items, encoders.encode_texts, "text", encoders.text_batch_size,
                                     arguments.num_workers, arguments.repeats)
            results["rows"][name] = {"images_per_s": arguments.images / image_seconds,
                                     "texts_per_s": arguments.texts / text_seconds}
        if arguments.transformers:
            encode_images, encode_texts = transformers_encoders(workspace / "checkpoint", arguments.device,
                                                                arguments.dtype, encoders.processor)
            encode_images(sorted((workspace / "images").iterdir())[: encoders.image_batch_size])  # warm-up
            results["rows"]["transformers"] = {
                "images_per_s": arguments.images / timed_run(image_items, encode_images, "image",
                                                             encoders.image_batch_size, arguments.num_workers,
                                                             arguments.repeats),
                "texts_per_s": arguments.texts / timed_run(text_items, encode_texts, "text", encoders.text_batch_size,
                                                           arguments.num_workers, arguments.repeats)}
        dim = encoders.dim
        optimized = load_encoders(workspace / "checkpoint", device=arguments.device, dtype=arguments.dtype)
        device = torch.device(arguments.device)
        pixels = optimized.processor.image_processor(
            [Image.open(path).convert("RGB") for path in sorted((workspace / "images").iterdir())]).to(device)
        batches = pixels.split(optimized.image_batch_size)

        def model_images():
            with torch.inference_mode():
                for batch in batches:
                    optimized.model.get_image_features(batch)

        results["rows"]["model alone"] = {
            "images_per_s": arguments.images / best_time(model_images, arguments.repeats, device),
            "texts_per_s": arguments.texts / best_time(lambda: optimized.encode_texts(captions), arguments.repeats,
                                                       device)}
        plain_model = build_openalign(arguments.preset)
        image_flops = count_flops(lambda: plain_model.get_image_features(pixels[:1].cpu().float()))
        text_flops = sum(count_flops(lambda text=text: plain_model.get_text_features(
            **optimized.processor.tokenizer([text], padding="longest"))) for text in captions[:64]) / min(64,
                                                                                                         len(captions))
        peak = matmul_peak(torch.float32 if arguments.dtype == "float32" else torch.bfloat16, device) * 1e9
        results["flops"] = {"per_image": image_flops, "per_text": text_flops, "matmul_peak_flops": peak}
        results["rows"]["FLOP limit"] = {"images_per_s": peak / image_flops, "texts_per_s": peak / text_flops}

        def no_model(batch):
            return torch.zeros(len(batch), dim)

        results["rows"]["no model"] = {
            "images_per_s": arguments.images / timed_run(image_items, no_model, "image", encoders.image_batch_size,
                                                         arguments.num_workers, arguments.repeats),
            "texts_per_s": arguments.texts / timed_run(text_items, no_model, "text", encoders.text_batch_size,
                                                       arguments.num_workers, arguments.repeats),
        }
    rows = results["rows"]
    results["end_to_end_vs_model_alone"] = {key: rows["optimized"][key] / rows["model alone"][key]
                                            for key in rows["plain"]}
    results["optimized_vs_plain"] = {key: rows["optimized"][key] / rows["plain"][key] for key in rows["plain"]}
    if "transformers" in rows:
        results["optimized_vs_transformers"] = {key: rows["optimized"][key] / rows["transformers"][key]
                                                for key in rows["plain"]}

    if arguments.json:
        print(json.dumps(results, indent=1))
        return
    print(f"embed end to end from files, {arguments.preset} ({arguments.dtype}), {arguments.images} JPEGs "
          f"400x300, {arguments.texts} captions, {results['threads']} thread(s), best of {arguments.repeats}")
    print(f"{'pipeline':12} {'images/s':>10} {'texts/s':>10}")
    for name, row in rows.items():
        print(f"{name:12} {row['images_per_s']:10.1f} {row['texts_per_s']:10.1f}")
    ratio = results["end_to_end_vs_model_alone"]
    print(f"end to end / model alone: images {ratio['images_per_s']:.2f}, texts {ratio['texts_per_s']:.2f}")
    ratio = results["optimized_vs_plain"]
    print(f"optimized / plain: images {ratio['images_per_s']:.2f}x, texts {ratio['texts_per_s']:.2f}x")
    if "optimized_vs_transformers" in results:
        ratio = results["optimized_vs_transformers"]
        print(f"optimized / transformers: images {ratio['images_per_s']:.2f}x, texts {ratio['texts_per_s']:.2f}x")


if __name__ == "__main__":
    main()
