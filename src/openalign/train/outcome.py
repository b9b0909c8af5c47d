"""What a finished run tells its user (`openalign train` prints it): how it ended, its last validation
figures, where its model is, and the commands that take the model next."""

from __future__ import annotations

import shlex
from typing import Any

from openalign.train.config import TrainConfig

DIRECTIONS = (("image_to_text", "image -> text"), ("text_to_image", "text -> image"))
# What a usable model took on the built-in data: the demo's tiny model, which ranks a held-out pair's caption in
# its image's top 5 of 100 more than 80% of the time (docs/demo.md, "Measured here": 1,081 steps).
USABLE_STEPS, USABLE_BATCH_SIZE, USABLE_PAIRS = 1_000, 256, 20_000


def describe_run(result: Any, config: TrainConfig) -> str:
    """Lines for the end of a run: `result` is the trainer's TrainResult of a run of `config`."""
    metrics, settings = result.metrics, config.run
    planned = metrics.get("total_steps", config.optim.total_steps)
    if result.stop_reason == "interrupted":
        return describe_interruption(result, planned)
    if result.stop_reason == "time_budget":
        ending = f"stopped by the time budget ({settings.max_minutes:g} min) at step {result.step} of {planned}"
        warmup = config.optim.warmup_steps
        if result.step < warmup:  # the schedule never left its warm-up: the plan could not fit the time
            ending += (f" (within the warm-up of optim.warmup_steps = {warmup}: give run.max_minutes more time or "
                       "the warm-up fewer steps)")
        elif settings.time_fitted:  # re-planned at every window, yet the last one ran slower than the ones before
            ending += (f", {planned - result.step} short of the end its schedule was re-planned to: the machine "
                       f"slowed in the last {settings.log_every} steps; the learning rate was at "
                       f"{metrics.get('lr', float('nan')) / config.optim.lr:.0%} of its peak")
        else:
            ending += " (run.fit_steps_to_time is off: the schedule was cut where the time ran out)"
    else:
        ending = f"finished {result.step} steps"
        if settings.time_fitted:
            ending += (f", the schedule ended as planned: the step count re-planned to the "
                       f"{settings.max_minutes:g}-minute budget at every log window")
    if metrics.get("loss") is not None:
        ending += f"; training loss {metrics['loss']:.3f}"
    lines = [ending]
    if "val_num_pairs" in metrics:
        lines.append(f"validation on {metrics['val_num_pairs']} pairs of {config.data.val}: loss "
                     f"{metrics['val_loss']:.3f}; recall as a fraction of the queries (chance R@1 "
                     f"{metrics['val_chance_r1']:.3f}):")
        for key, name in DIRECTIONS:
            figures = "  ".join(f"R@{k} {metrics[f'val_{key}_r{k}']:.3f}" for k in (1, 5, 10))
            lines.append(f"  {name}  {figures}")
    lines += describe_progress(result, config)
    model = result.run_dir / "model"
    quoted = shlex.quote(str(model))
    lines += [
        f"model: {model} (weights, tokenizer and image settings; any openalign command or "
        "AlignModel.from_pretrained takes it)",
        "next:",
        f"  openalign zero-shot -m {quoted} photo.jpg --labels cat dog 'red car'",
        f"  openalign embed photos/ -m {quoted} --out embeddings && openalign index embeddings",
        f"  openalign plot {shlex.quote(str(result.run_dir))}",
    ]
    return "\n".join(lines)


def describe_progress(result: Any, config: TrainConfig) -> list[str]:
    """How far the run got (its validation R@1 against chance) and, for a run smaller than the demo's usable one,
    its scale beside that one's: a short run's model finds little, and nothing else would say why."""
    metrics, batch_size = result.metrics, config.optim.batch_size
    lines = []
    if "val_num_pairs" in metrics:
        recall = sum(metrics[f"val_{key}_r1"] for key, _ in DIRECTIONS) / len(DIRECTIONS)
        times = recall / metrics["val_chance_r1"]
        verdict = ("hardly above it: the model has not learnt to match images and captions yet, and its searches "
                   "are close to random" if times < 2 else "it has learnt something")
        lines.append(f"mean R@1 is {times:.1f} times chance: {verdict}")
    else:
        lines.append("no validation pairs (data.val): nothing measured how far the run got")
    if result.step * batch_size < USABLE_STEPS * USABLE_BATCH_SIZE:
        from openalign.data.sources import count_records

        pairs = count_records(config.data.train)
        lines.append(f"this run: {result.step} steps of {batch_size}" + (f" over {pairs:,} pairs" if pairs else "")
                     + f"; the demo's usable model took about {USABLE_STEPS:,} steps of {USABLE_BATCH_SIZE} over "
                     f"{USABLE_PAIRS:,} pairs (docs/demo.md): train longer (--run.max_minutes, --optim.total_steps) "
                     "on more pairs")
    return lines


def describe_interruption(result: Any, planned: int) -> str:
    """What an interrupted run says: the checkpoint it saved and the command that continues it (the run
    folder's config.yaml holds the settings, so the folder and --resume are all it needs)."""
    run_dir = shlex.quote(str(result.run_dir))
    return (f"interrupted at step {result.step} of {planned}: saved {result.last_checkpoint}\n"
            f"continue with the same command and --resume latest, e.g.:\n"
            f"  openalign train --run.out_dir {run_dir} --resume latest")
