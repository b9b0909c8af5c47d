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


def lr_lambda(step: int, warmup_steps: int, total_steps: int, kind: str = "cosine", final_ratio: float = 0.0) -> float:
    """The multiplier of the base learning rate at optimiser step ``step`` (counted from 0).

    Warm-up: (step + 1) / warmup_steps, so the first step already moves and step warmup_steps - 1 reaches the
    full rate. Then from step warmup_steps to total_steps the multiplier goes from 1 to ``final_ratio``
    (cosine or linear; constant stays at 1), and stays at ``final_ratio`` after total_steps.
    ALIGN: 10k warm-up steps, then linear decay to 0 at 1.2M steps.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
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


def set_total_steps(scheduler: torch.optim.lr_scheduler.LambdaLR, total_steps: int) -> None:
    """Point a scheduler from `build_scheduler` at a new total step count; the next `scheduler.step()` uses it.
    Steps already taken keep their rates; the decay from here on follows the new total."""
    for index, multiplier in enumerate(scheduler.lr_lambdas):
        if not isinstance(multiplier, functools.partial) or multiplier.func is not lr_lambda:
            raise TypeError("set_total_steps needs a scheduler made by build_scheduler")
        warmup_steps = multiplier.keywords["warmup_steps"]
        if total_steps < warmup_steps:
            raise ConfigError(f"need total_steps >= warmup_steps = {warmup_steps}, got {total_steps}")
        keywords = {**multiplier.keywords, "total_steps": total_steps}
        scheduler.lr_lambdas[index] = functools.partial(lr_lambda, **keywords)


class TimeFit:
    """`run.fit_steps_to_time`: the total step count that ends the schedule with the time budget.

    Every step is timed (data loading included; validation and checkpointing not). After the warm-up, while
    the decay is in its first quarter, every step re-plans: total = step + (margin x budget - elapsed) / (mean
    of the last WINDOW step times), the slowest rank's mean under torch.distributed so that every rank plans
    the same. Near the start of a cosine or linear decay the learning rate hardly depends on the total, so the
    re-plans move it by little; a first epoch slowed by decoding (images cached after it) is outgrown by the
    window before the plan settles."""

    WINDOW = 30
    MARGIN = 0.98  # of the budget: the last checkpoint and the model files are written after the last step

    def __init__(self, budget_seconds: float, warmup_steps: int, clock=time.monotonic):
        self.budget, self.warmup_steps, self.clock = budget_seconds, warmup_steps, clock
        self.durations: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self.last = clock()

    def resume_clock(self) -> None:
        """Start the next step's timing now."""
        self.last = self.clock()

    def replan(self, step: int, total_steps: int, elapsed: float) -> int:
        """The total step count after step `step` (1-based) with `elapsed` seconds gone."""
        now = self.clock()
        self.durations.append(now - self.last)
        self.last = now
        decaying = step - self.warmup_steps
        if decaying < 0 or decaying > 0.25 * (total_steps - self.warmup_steps) or len(self.durations) < self.WINDOW:
            return total_steps
        seconds = max_over_ranks(sum(self.durations) / len(self.durations))
        remaining = max(0.0, self.MARGIN * self.budget - elapsed)
        return max(step + 1, self.warmup_steps, step + math.floor(remaining / seconds))
