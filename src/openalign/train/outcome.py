"""What a finished run tells its user (`openalign train` prints it): how it ended, its last validation
figures, where its model is, and the commands that take the model next."""

from __future__ import annotations

import shlex
from typing import Any

from openalign.train.config import TrainConfig

DIRECTIONS = (("image_to_text", "image -> text"), ("text_to_image", "text -> image"))


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
    else:
        ending = f"finished {result.step} steps"
        if settings.time_fitted:
            ending += f" (the step count fitted to the {settings.max_minutes:g}-minute budget)"
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


def describe_interruption(result: Any, planned: int) -> str:
    """What an interrupted run says: the checkpoint it saved and the command that continues it (the run
    folder's config.yaml holds the settings, so the folder and --resume are all it needs)."""
    run_dir = shlex.quote(str(result.run_dir))
    return (f"interrupted at step {result.step} of {planned}: saved {result.last_checkpoint}\n"
            f"continue with the same command and --resume latest, e.g.:\n"
            f"  openalign train --run.out_dir {run_dir} --resume latest")
