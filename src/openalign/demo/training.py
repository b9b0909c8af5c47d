"""The demo's training, as the demo and its curation stage both run it: the TrainConfig (`training_config`), the
step probe on real batches (`measure_step_seconds`, through `probe_stepper`, the trainer's own step), the
precision it trains in (`resolve_precision`: bfloat16 autocast where it measured faster), the steps that fit in
a time (`planned_steps`) and the image term's weight for a run of a given length."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from openalign.model_config import AlignConfig

# The image term's weight when DemoConfig.image_ssl_weight is None, and the shortest run that gets it: at half
# weight the term pays in runs as long as 10 minutes give on 2 cores, at full weight it costs colour, and in
# shorter runs it costs colour before it pays (docs/demo.md, "Three seeds a configuration, on a GPU").
IMAGE_SSL_WEIGHT = 0.5
IMAGE_SSL_MIN_STEPS = 700


def probe_stepper(model_config: AlignConfig, train_config):
    """(a fresh model in training mode, the Stepper that trains it as `train_config` says): its loss and image
    term, built and wired as the trainer builds them (`build_stepper`), the trainer's optimiser and gradient
    clipping and precision, channels-last, on the CPU."""
    import torch
    from torch import nn

    from openalign.models.align import AlignModel
    from openalign.models.utils import trainable_init
    from openalign.train.builders import build_contrastive_loss
    from openalign.train.image_ssl import build_image_ssl
    from openalign.train.loop import build_stepper
    from openalign.train.optim import build_optimizer
    from openalign.train.trainer import AUTOCAST_DTYPES

    model = AlignModel(model_config).train()
    trainable_init(model.vision_model)
    model.vision_model.to(memory_format=torch.channels_last)
    loss = build_contrastive_loss(train_config.loss, model)
    image_ssl = build_image_ssl(train_config.loss, model_config.projection_dim)
    holder = nn.ModuleList([model, loss] if image_ssl is None else [model, loss, image_ssl])
    optim = train_config.optim
    optimizer = build_optimizer(optim.name, holder, optim.lr, optim.weight_decay, optim.betas, optim.eps)
    return model, build_stepper(model, loss, optimizer, image_ssl=image_ssl, channels_last=True,
                                grad_clip=optim.grad_clip, autocast_dtype=AUTOCAST_DTYPES[train_config.run.dtype])


def resolve_precision(config, manifest: Path, model_config: AlignConfig, model_config_path: Path, tokenizer,
                      out: Path):
    """(config with `precision` decided, how it was decided). `config.precision` "fp32" or "bf16" is kept;
    "auto" takes the faster of the two for the trainer's own step on a real batch of `manifest` (the image term
    at the weight of a run long enough for it), measured by `runtime.faster_precision`: bfloat16 autocast only
    on a CPU with native bfloat16 kernels, and only where it measured faster, as the OpenMP wait policy is
    chosen by measuring the machine."""
    from openalign.runtime import faster_precision
    from openalign.train.builders import build_loaders
    from openalign.train.trainer import AUTOCAST_DTYPES

    if config.precision != "auto":
        return config, {"precision": config.precision, "chosen_by": "configuration"}
    long_run = dataclasses.replace(config, image_ssl_weight=image_ssl_weight_for(config, IMAGE_SSL_MIN_STEPS))
    train_config = training_config(long_run, manifest, out / "tokenizer", model_config_path, out / "run", 1, 1.0)
    loader, _ = build_loaders(train_config, tokenizer, model_config.vision_config.image_size)
    batch = next(iter(loader))
    _, stepper = probe_stepper(model_config, train_config)

    def step_seconds(precision: str) -> float:
        stepper.autocast_dtype = AUTOCAST_DTYPES[precision]
        started = time.monotonic()
        stepper.step(batch, 1)
        return time.monotonic() - started

    started = time.monotonic()
    choice = faster_precision(step_seconds)
    choice.update(chosen_by="measurement", probe_seconds=time.monotonic() - started)
    return dataclasses.replace(config, precision=choice["precision"]), choice


def measure_step_seconds(model_config: AlignConfig, train_config, tokenizer, batches: int = 4) -> dict:
    """Seconds per training step of a fresh model, measured on real batches of the training loader:

    - `load`: a batch as the first epoch loads it (read, decode, crop, tokenise);
    - `decode`: the reading, decoding and resizing part of that, which `data.cache_images` saves from the second
      epoch on;
    - `model`: the trainer's own step (`probe_stepper`: forward, loss with the self-supervised term when it is
      on, backward, AdamW), channels-last, after two warm-up steps.
    Used to size the run so that the cosine schedule ends when the time does (see `planned_steps`)."""
    import itertools

    from openalign.data import sources
    from openalign.train.builders import build_loaders

    loader, _ = build_loaders(train_config, tokenizer, model_config.vision_config.image_size)
    iterator = iter(loader)
    next(iterator)  # the first batch also pays for opening the manifest
    started = time.monotonic()
    real = [next(iterator) for _ in range(batches)]
    load_seconds = (time.monotonic() - started) / batches

    records = list(itertools.islice(sources.iter_records(train_config.data.train), train_config.optim.batch_size))
    dataset = loader.dataset
    started = time.monotonic()
    for record in records:
        dataset.cache_entry(dataset.decode(record.open_image_bytes()))
    decode_seconds = (time.monotonic() - started) * train_config.optim.batch_size / max(1, len(records))

    _, stepper = probe_stepper(model_config, train_config)
    durations = []
    for number, batch in enumerate([*real[:2], *real], start=1):
        started = time.monotonic()
        stepper.step(batch, number)
        durations.append(time.monotonic() - started)
    return {"load": load_seconds, "decode": min(decode_seconds, load_seconds), "model": sum(durations[2:]) / batches}


def planned_steps(seconds: float, step: dict, steps_per_epoch: int, cached: bool, margin: float = 0.97) -> int:
    """How many steps fit in `seconds` (times `margin`, for logging and the final checkpoint) with the step
    times of `measure_step_seconds`: full loading cost in the first epoch, loading without decoding after it
    when decoded images are cached."""
    budget = margin * seconds
    first = step["model"] + step["load"]
    later = first - step["decode"] if cached else first
    if budget <= steps_per_epoch * first:
        return max(1, math.floor(budget / first))
    return steps_per_epoch + math.floor((budget - steps_per_epoch * first) / later)


def image_ssl_weight_for(config, total_steps: int) -> float:
    """The image term's weight in a run of `total_steps`: as configured, or by default IMAGE_SSL_WEIGHT when the
    run is long enough for the term to pay and 0 (off) when it is not."""
    if config.image_ssl_weight is not None:
        return config.image_ssl_weight
    return IMAGE_SSL_WEIGHT if total_steps >= IMAGE_SSL_MIN_STEPS else 0.0


def robust_overrides(config) -> dict:
    """The loss settings of curation "robust" (a robust loss, per-pair weights after a warm-up); none else."""
    if config.curation != "robust":
        return {}
    # The temperature stays at its start: RINCE's -exp(q z_ii) / q term rewards an ever lower temperature (the
    # loss has no floor), and RCL, which never pulls a positive, lets it drift up; both papers fix it.
    return {"loss.name": config.robust_loss, "loss.pair_weighting": config.pair_weighting,
            "loss.pair_weighting_warmup": config.pair_weighting_warmup, "loss.fixed_temperature": True}


def training_config(config, manifest: Path, tokenizer_dir: Path, model_config_path: Path,
                    run_dir: Path, total_steps: int, minutes: float):
    """The TrainConfig of the demo (`config`: a DemoConfig): the reference's fast CPU recipe (AdamW, warm-up
    then cosine, channels-last, temperature 0.07, no flips since captions name left and right), in
    `config.precision` (float32 while it is still "auto", before `resolve_precision`)."""
    from openalign.train.config import load_config
    from openalign.train.recipes import get_recipe

    overrides = {
        "model.config": str(model_config_path), "model.temperature_init": config.temperature_init,
        "model.batch_norm_momentum": config.batch_norm_momentum,
        "data.train": str(manifest), "data.tokenizer": str(tokenizer_dir), "data.image_size": config.image_size,
        "data.resize": round(config.image_size * 72 / 64), "data.flip": False, "data.max_length": config.max_length,
        "data.shuffle_buffer": 5000, "data.num_workers": config.loader_workers, "data.cache_images": True,
        "optim.lr": config.lr, "optim.weight_decay": config.weight_decay, "optim.batch_size": config.batch_size,
        "optim.total_steps": total_steps, "optim.warmup_steps": min(config.warmup_steps, max(1, total_steps // 10)),
        "loss.label_smoothing": config.label_smoothing,
        "loss.image_ssl_weight": image_ssl_weight_for(config, total_steps),
        "loss.image_ssl_images": (config.batch_size // 2 if config.image_ssl_images is None
                                  else config.image_ssl_images),
        "loss.image_ssl_warmup_steps": round(config.image_ssl_warmup * total_steps),
        "run.out_dir": str(run_dir), "run.seed": config.seed, "run.max_minutes": minutes,
        "run.fit_steps_to_time": config.steps is None,  # a run sized by time ends its schedule with the time
        "run.checkpoint_every": 10**9, "run.keep_last": 1, "run.val_every": 0,  # one checkpoint: the last step's
        "run.log_every": 10, "run.progress": config.progress, "run.tensorboard": False,
        "run.dtype": "fp32" if config.precision == "auto" else config.precision,
        # Every run keeps per-pair estimates, so each reports what its own estimates separate (demo/curation.py).
        "loss.pair_estimates": True,
        **robust_overrides(config),
        **config.train_overrides,
    }
    return load_config(base=get_recipe("cpu-small"), overrides=overrides)
