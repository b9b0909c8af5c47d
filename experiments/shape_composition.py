"""Can the demo's image tower compose shape at all? Train it with shape labels, score unseen colour-shape pairs.

The demo's held-out shape error could come from the contrastive signal or from the image tower and the data.
This script takes the contrastive part away: the demo's image tower (same config, same initialisation, same
loader and augmentation) plus a linear head, trained with cross-entropy on the *shape* of each training
image (ground truth from the generator's manifest, so caption noise plays no part) for a fixed number of
steps, then scored on the held-out split (colour-shape pairs never drawn in training) and on the seen split.
A gap between the two is the image tower's own failure to compose; what narrows it is a property of the
data or the architecture, whatever the loss.

    python experiments/shape_composition.py --out runs/shape --grayscale-rate 0.25                 # ~4 minutes
    python experiments/shape_composition.py --out runs/shape --grayscale-rate 0.25 --colour-background-rate 0.25

Results from this machine are in docs/demo.md. Not a test.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path


def train_shape_classifier(manifest: Path, image_size: int, steps: int, batch_size: int, seed: int):
    """(image tower, linear head, shape names) trained with shape labels on a manifest of the generator."""
    import torch
    import torch.nn.functional as F

    from openalign.data.dataset import ImageTextDataset, make_loader, train_transform
    from openalign.data.sources import iter_records
    from openalign.data.synth import SHAPES
    from openalign.demo.pipeline import DemoConfig
    from openalign.models.align import AlignModel
    from openalign.models.utils import trainable_init
    from openalign.train.schedule import lr_lambda

    labels = {record.key: SHAPES.index(record.extra["shape"]) for record in iter_records(manifest)}
    torch.manual_seed(seed)
    demo = DemoConfig(image_size=image_size)
    model = AlignModel(demo.model_config(demo.vocab_size))
    vision = model.vision_model.train()
    trainable_init(vision)
    vision.to(memory_format=torch.channels_last)
    head = torch.nn.Linear(model.config.vision_config.hidden_dim, len(SHAPES))
    optimizer = torch.optim.AdamW([*vision.parameters(), *head.parameters()], lr=demo.lr,
                                  weight_decay=demo.weight_decay)
    warmup = min(demo.warmup_steps, max(1, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(  # warm-up then cosine, as the demo trains
        optimizer, functools.partial(lr_lambda, warmup_steps=warmup, total_steps=steps, kind="cosine"))
    resize = round(image_size * 72 / 64)
    transform = functools.partial(train_transform, resize=resize, crop=image_size)
    dataset = ImageTextDataset(str(manifest), transform=transform, seed=seed, shuffle_buffer=5000, flip=False,
                               cache_images=True)
    loader = make_loader(dataset, batch_size=batch_size)
    batches = iter(loader)
    for step in range(steps):
        try:
            batch = next(batches)
        except StopIteration:  # a new epoch
            batches = iter(loader)
            batch = next(batches)
        target = torch.tensor([labels[key] for key in batch["keys"]])
        pixels = batch["pixel_values"].contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(head(vision(pixel_values=pixels).pooler_output), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    return vision.eval(), head, list(SHAPES), resize


def split_accuracy(vision, head, shapes, split_dir: Path, image_size: int, resize: int) -> float:
    """Shape accuracy of the classifier on a split of the generator (its manifest.jsonl and images)."""
    import torch
    from PIL import Image

    from openalign.demo.evaluate import read_rows
    from openalign.train.builders import eval_transform

    rows = read_rows(split_dir / "manifest.jsonl")
    correct = 0
    with torch.no_grad():
        for start in range(0, len(rows), 256):
            chunk = rows[start:start + 256]
            pixels = torch.stack([eval_transform(Image.open(split_dir / row["image_path"]).convert("RGB"),
                                                 resize=resize, crop=image_size) for row in chunk])
            predicted = head(vision(pixel_values=pixels.contiguous(memory_format=torch.channels_last)).pooler_output)
            correct += sum(int(p) == shapes.index(row["shape"]) for p, row in zip(predicted.argmax(1), chunk))
    return correct / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the generated data")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grayscale-rate", type=float, default=None, help="default: the demo's")
    parser.add_argument("--colour-background-rate", type=float, default=None, help="default: the demo's")
    args = parser.parse_args()
    from openalign.runtime import configure_allocator, set_omp_wait_policy

    set_omp_wait_policy()  # as `openalign demo` chooses it, before torch loads below
    configure_allocator()
    from openalign.demo.pipeline import DemoConfig, prepare_data

    overrides = {name: getattr(args, name) for name in ("grayscale_rate", "colour_background_rate")
                 if getattr(args, name) is not None}
    demo = DemoConfig(out_dir=args.out, n=args.n, seed=args.seed, image_size=args.image_size, progress=False,
                      **overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest, summary, _ = prepare_data(demo, out, {})  # generated and filtered as the demo does
    started = time.monotonic()
    vision, head, shapes, resize = train_shape_classifier(manifest, args.image_size, args.steps, args.batch_size,
                                                          args.seed)
    figures = {split: split_accuracy(vision, head, shapes, out / "data" / split, args.image_size, resize)
               for split in ("heldout", "seen")}
    result = {"grayscale_rate": demo.grayscale_rate, "colour_background_rate": demo.colour_background_rate,
              "steps": args.steps, "image_size": args.image_size, "clean_renderings": summary["clean_renderings"],
              "shape_accuracy_heldout": figures["heldout"], "shape_accuracy_seen": figures["seen"],
              "train_seconds": round(time.monotonic() - started, 1)}
    print(json.dumps(result, indent=1))
    (out / "shape_composition.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
