"""Learning-rate schedules: linear warm-up, then cosine, linear or constant, as a resumable LambdaLR."""

from __future__ import annotations

import functools
import math

import torch

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
