"""Shared by the training tests: a few hundred generated image-caption pairs, a tokenizer trained on their
captions, and a tiny-model TrainConfig that trains on them in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

from openalign.data.sources import iter_records
from openalign.data.synth import NOISE_KINDS, SynthConfig, generate
from openalign.processing.tokenizer import train_wordpiece
from openalign.train.config import TrainConfig, load_config

IMAGE_SIZE = 32


def make_data(folder: Path, num_pairs: int = 320, samples_per_shard: int = 100) -> dict[str, Path]:
    """Clean coloured-shape pairs (manifest and WebDataset shards), a held-out manifest and a WordPiece
    tokenizer; returns their paths."""
    config = SynthConfig(image_size=IMAGE_SIZE, **{f"{kind}_rate": 0.0 for kind in NOISE_KINDS})
    summary = generate(folder, num_pairs, config, seed=0, workers=1, shards=True,
                       samples_per_shard=samples_per_shard, heldout_n=64)
    manifest = folder / summary["manifests"]["train"]
    captions = [record.caption for record in iter_records(manifest)]
    train_wordpiece(captions, vocab_size=160, out_dir=folder / "tokenizer", min_frequency=1)
    return {"train": manifest, "val": folder / summary["manifests"]["heldout"], "shards": folder / "shards",
            "tokenizer": folder / "tokenizer"}


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
