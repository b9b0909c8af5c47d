"""Shared by the training tests: a few hundred generated image-caption pairs, a tokenizer trained on their
captions, and a tiny-model TrainConfig that trains on them in seconds on a CPU."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from openalign.data.sources import Record, write_manifest, write_shards
from openalign.processing.tokenizer import train_wordpiece
from openalign.train.config import TrainConfig, load_config

IMAGE_SIZE = 32


COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 220, 40),
           "purple": (140, 40, 170), "orange": (245, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle", "bar")


def draw_pair(rng: random.Random, index: int) -> tuple[Image.Image, str]:
    """A shape of one colour on a grey background, at a random place and size, and "a {colour} {shape}"."""
    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (128 + rng.randint(-20, 20),) * 3)
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(6, 11)
    x, y = rng.uniform(radius, IMAGE_SIZE - radius), rng.uniform(radius, IMAGE_SIZE - radius)
    box = (x - radius, y - radius, x + radius, y + radius)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    elif shape == "triangle":
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=COLOURS[colour])
    else:
        draw.rectangle((x - radius, y - radius / 3, x + radius, y + radius / 3), fill=COLOURS[colour])
    return image, f"a {colour} {shape}"


def make_data(folder: Path, num_pairs: int = 320, samples_per_shard: int = 100, num_val: int = 64) -> dict[str, Path]:
    """Coloured-shape pairs as PNG files with a manifest (and as WebDataset shards), a held-out manifest, and a
    WordPiece tokenizer trained on the captions; returns their paths."""
    rng = random.Random(0)
    paths = {}
    for split, count in (("train", num_pairs), ("val", num_val)):
        (folder / split).mkdir(parents=True)
        records = []
        for index in range(count):
            image, caption = draw_pair(rng, index)
            image_path = folder / split / f"{index:05d}.png"
            image.save(image_path)
            records.append(Record(key=f"{split}-{index:05d}", caption=caption, image_path=image_path))
        paths[split] = write_manifest(records, folder / split / "manifest.jsonl")
        if split == "train":
            write_shards(records, folder / "shards", samples_per_shard=samples_per_shard)
            captions = [record.caption for record in records]
    train_wordpiece(captions, vocab_size=100, out_dir=folder / "tokenizer", min_frequency=1)
    return {**paths, "shards": folder / "shards", "tokenizer": folder / "tokenizer"}


def tiny_config(data: dict[str, Path], run_dir: Path, **overrides) -> TrainConfig:
    """The tiny preset at 32 px, AdamW with a short warmup, fp32, no progress bar; `overrides` by dotted key
    ("optim.total_steps": 8)."""
    values = {
        "model.preset": "tiny", "model.temperature_init": 0.1,
        "data.train": str(data["train"]), "data.tokenizer": str(data["tokenizer"]),
        "data.image_size": IMAGE_SIZE, "data.resize": 36, "data.flip": False, "data.max_length": 16,
        "optim.name": "adamw", "optim.lr": 2e-3, "optim.weight_decay": 0.01, "optim.warmup_steps": 2,
        "optim.total_steps": 8, "optim.schedule": "cosine", "optim.batch_size": 16, "optim.grad_clip": 5.0,
        "run.out_dir": str(run_dir), "run.checkpoint_every": 4, "run.log_every": 1, "run.progress": False,
        "run.tensorboard": False, "run.plots": False,
    }
    values.update({key: (str(value) if isinstance(value, Path) else value) for key, value in overrides.items()})
    return load_config(overrides=values)
