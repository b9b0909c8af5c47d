"""Learning-rate schedules: linear warm-up, then cosine, linear or constant, as a resumable LambdaLR whose total
step count can be re-pointed, and `TimeFit`, which re-points it to end with a time budget."""

from __future__ import annotations

import collections
import functools
import math
import time

import torch

from openalign.distributed import max_over_ranks
from openalign.errors import ConfigError

KINDS = ("cosine", "linear", "constant")


def lr_lambda(step: int, warmup_steps: int, total_steps: int, kind: str = "cosine", final_ratio: float = 0.0,
              anchor_step: int | None = None, anchor_progress: float = 0.0) -> float:
    """The multiplier of the base learning rate at optimiser step ``step`` (counted from 0).

    Warm-up: (step + 1) / warmup_steps, so the first step already moves and step warmup_steps - 1 reaches the
    full rate. Then from step warmup_steps to total_steps the multiplier goes from 1 to ``final_ratio``
    (cosine or linear; constant stays at 1), and stays at ``final_ratio`` after total_steps.
    ALIGN: 10k warm-up steps, then linear decay to 0 at 1.2M steps.

    A total re-pointed during the decay (`set_total_steps(..., from_step=)`) keeps the decay's progress at the
    ``anchor_step`` it was re-pointed at (``anchor_progress``) and spreads the rest of it over the steps to the
    new total, so the rate does not jump.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if anchor_step is not None and step >= anchor_step:
        progress = min(1.0, anchor_progress + (1.0 - anchor_progress) * (step - anchor_step)
                       / max(1, total_steps - anchor_step))
    else:
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        shape = 1.0 - progress
    elif kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ConfigError(f"unknown schedule {kind!r}; choose one of {KINDS}")
    return final_ratio + (1.0 - final_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    kind: str = "cosine",
    final_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``lr_lambda``; call ``scheduler.step()`` after each ``optimizer.step()``.

    Its ``state_dict`` holds the step count, so loading it into a scheduler built with the same arguments
    resumes the schedule where it stopped; load the optimiser's state dict as well, since the learning rate
    of the first step after resuming is read from the optimiser's groups.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown schedule {kind!r}; choose one of {KINDS}")
    if warmup_steps < 0 or total_steps < warmup_steps:
        raise ConfigError(f"need 0 <= warmup_steps <= total_steps, got {warmup_steps} and {total_steps}")
    if not 0.0 <= final_ratio <= 1.0:
        raise ConfigError(f"final_ratio must be in [0, 1], got {final_ratio}")
    multiplier = functools.partial(
        lr_lambda, warmup_steps=warmup_steps, total_steps=total_steps, kind=kind, final_ratio=final_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def set_total_steps(scheduler: torch.optim.lr_scheduler.LambdaLR, total_steps: int,
                    from_step: int | None = None) -> None:
    """Point a scheduler from `build_scheduler` at a new total step count; the next `scheduler.step()` uses it.
    Steps already taken keep their rates. With `from_step` (the next step to take), the decay keeps the progress
    it has reached there and spreads the rest over the steps to the new total (no jump in the rate); without,
    the decay from here on follows the new total from its start (what a re-plan in the warm-up wants)."""
    for index, multiplier in enumerate(scheduler.lr_lambdas):
        if not isinstance(multiplier, functools.partial) or multiplier.func is not lr_lambda:
            raise TypeError("set_total_steps needs a scheduler made by build_scheduler")
        warmup_steps = multiplier.keywords["warmup_steps"]
        if total_steps < warmup_steps:
            raise ConfigError(f"need total_steps >= warmup_steps = {warmup_steps}, got {total_steps}")
        keywords = {**multiplier.keywords, "total_steps": total_steps}
        if from_step is not None and from_step > warmup_steps:
            keywords.update(anchor_step=from_step, anchor_progress=decay_progress(multiplier.keywords, from_step))
        scheduler.lr_lambdas[index] = functools.partial(lr_lambda, **keywords)


def decay_progress(keywords: dict, step: int) -> float:
    """How far through its decay (0 to 1) the schedule `lr_lambda(**keywords)` is at `step`."""
    warmup_steps, total_steps = keywords["warmup_steps"], keywords["total_steps"]
    anchor_step = keywords.get("anchor_step")
    if anchor_step is not None and step >= anchor_step:
        anchor_progress = keywords.get("anchor_progress", 0.0)
        return min(1.0, anchor_progress + (1.0 - anchor_progress) * (step - anchor_step)
                   / max(1, total_steps - anchor_step))
    return min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def schedule_state(scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict:
    """What a checkpoint keeps of a re-pointed schedule beyond LambdaLR's own state (which skips its
    functions): the total and the anchor of the last re-point during the decay."""
    keywords = scheduler.lr_lambdas[0].keywords
    return {"total_steps": keywords["total_steps"], "anchor_step": keywords.get("anchor_step"),
            "anchor_progress": keywords.get("anchor_progress", 0.0)}


def restore_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict) -> None:
    """Put back what `schedule_state` saved."""
    for index, multiplier in enumerate(scheduler.lr_lambdas):
        keywords = {**multiplier.keywords, "total_steps": state["total_steps"],
                    "anchor_step": state.get("anchor_step"), "anchor_progress": state.get("anchor_progress", 0.0)}
        scheduler.lr_lambdas[index] = functools.partial(lr_lambda, **keywords)


class TimeFit:
    """`run.fit_steps_to_time`: the total step count that ends the schedule with the time budget, followed as
    the machine's speed changes.

    Every step is timed (data loading included; validation and checkpointing not; the first step, which pays
    for first-touch allocations, is left out). Once MIN_STEPS are timed, every `every` steps (the trainer's log
    window) to the end, the plan is made again: total = step + (margin x budget - elapsed) / (mean of the last
    WINDOW step times), the slowest rank's mean under
    torch.distributed so that every rank plans the same. A re-plan during the decay keeps the decay's progress
    and spreads the rest over the new remaining steps (`set_total_steps(from_step=)`), so a machine that slows
    down or speeds up mid-run still ends its schedule when the time ends, without a jump in the rate. A first
    epoch slowed by decoding (images cached after it) is outgrown by the window."""

    WINDOW = 30
    MIN_STEPS = 5  # a first plan from a few steps; the windows after it correct it
    MARGIN = 0.98  # of the budget: the last checkpoint and the model files are written after the last step

    def __init__(self, budget_seconds: float, warmup_steps: int, clock=time.monotonic, every: int = 1):
        self.budget, self.warmup_steps, self.clock, self.every = budget_seconds, warmup_steps, clock, max(1, every)
        self.durations: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self.last = clock()

    def resume_clock(self) -> None:
        """Start the next step's timing now."""
        self.last = self.clock()

    def replan(self, step: int, total_steps: int, elapsed: float) -> int:
        """The total step count after step `step` (1-based) with `elapsed` seconds gone."""
        now = self.clock()
        if step > 1:
            self.durations.append(now - self.last)
        self.last = now
        first_plan = len(self.durations) == self.MIN_STEPS
        if len(self.durations) < self.MIN_STEPS or (step % self.every and not first_plan) or step >= total_steps:
            return total_steps
        seconds = max_over_ranks(sum(self.durations) / len(self.durations))
        remaining = max(0.0, self.MARGIN * self.budget - elapsed)
        return max(step + 1, self.warmup_steps, step + math.floor(remaining / seconds))
