"""Named training recipes: partial TrainConfig dicts that a config file and the command line refine.

Kept as Python dicts rather than YAML files so they ship with the package without package-data settings.
"""

from __future__ import annotations

import copy
from typing import Any

from openalign.errors import ConfigError

RECIPES: dict[str, dict[str, Any]] = {
    # The paper (Jia et al. 2021, section 5): EfficientNet-L2 + BERT-large from scratch; LAMB, weight decay 1e-5,
    # lr warmed up linearly to 1e-3 over 10k steps then decayed linearly to 0 at 1.2M steps; global batch
    # 16,384 (1024 cores x 16); 289 px random crops of 346 px resizes with horizontal flips; 64 tokens;
    # label smoothing 0.1; temperature learned from 1.0. Divide batch_size by the number of processes.
    "paper": {
        "model": {"preset": "align-l2-large", "temperature_init": 1.0},
        "data": {"image_size": 289, "resize": 346, "flip": True, "max_length": 64},
        "optim": {"name": "lamb", "lr": 1e-3, "weight_decay": 1e-5, "warmup_steps": 10_000,
                  "total_steps": 1_200_000, "schedule": "linear", "min_lr_ratio": 0.0, "batch_size": 16_384},
        "loss": {"name": "align", "label_smoothing": 0.1},
        "run": {"dtype": "bf16", "checkpoint_every": 5000, "val_every": 5000},
    },
    # kakaobrain's COYO-700M reproduction of align-base (EfficientNet-B7 + BERT-base).
    "coyo-align-base": {
        "model": {"preset": "align-base", "temperature_init": 1.0},
        "data": {"image_size": 289, "resize": 346, "flip": True, "max_length": 64},
        "optim": {"name": "lamb", "lr": 2e-3, "weight_decay": 1e-5, "warmup_steps": 40_000,
                  "total_steps": 300_000, "schedule": "linear", "batch_size": 65_536},
        "loss": {"name": "align", "label_smoothing": 0.1},
        "run": {"dtype": "bf16", "checkpoint_every": 5000, "val_every": 5000},
    },
    # A small model that learns something in minutes on a CPU (see ALIGN-REFERENCE.md: temperature 0.07,
    # channels-last, fp32, no flips).
    "cpu-small": {
        "model": {"preset": "tiny", "temperature_init": 0.07},
        "data": {"image_size": 64, "resize": 72, "flip": False, "max_length": 16},
        "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.05, "warmup_steps": 50, "total_steps": 1000,
                  "schedule": "cosine", "batch_size": 256, "grad_clip": 5.0},
        "run": {"dtype": "fp32", "channels_last": True, "checkpoint_every": 200, "val_every": 200},
    },
}


def get_recipe(name: str) -> dict[str, Any]:
    """A copy of a named recipe (paper, coyo-align-base, cpu-small) as a nested dict."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return copy.deepcopy(RECIPES[name])
