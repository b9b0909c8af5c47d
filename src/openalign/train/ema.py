"""An exponential moving average of a model's weights, for evaluation."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from openalign.errors import ConfigError


class ModelEma:
    """Keeps ``ema = decay * ema + (1 - decay) * weights`` after each ``update(model)``.

    Floating-point parameters and buffers are averaged; integer buffers (BatchNorm's num_batches_tracked) are
    copied. The average lives in ``self.module``, an eval-mode copy of the (unwrapped) model that can be
    evaluated directly, or swapped into the training model with ``swapped_into(model)``. Give it the model
    inside a DDP wrapper (``unwrap_model``); every rank then holds the same average, since the weights are
    the same. FSDP2-sharded models are not covered (the copy would be sharded too).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)

    def _pairs(self, model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        averaged, current = self.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        if averaged.keys() != current.keys():
            missing = sorted(set(averaged) ^ set(current))[:5]
            raise KeyError(f"the model's state-dict keys differ from the EMA copy's, e.g. {missing}")
        for name, tensor in averaged.items():
            yield tensor, current[name]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards the model's current weights (call after each optimiser step)."""
        self.num_updates += 1
        for averaged, current in self._pairs(model):
            if averaged.is_floating_point():
                averaged.lerp_(current.detach(), 1.0 - self.decay)
            else:
                averaged.copy_(current)

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block the model holds the averaged weights; its own come back afterwards."""
        pairs = list(self._pairs(model))
        saved = [current.detach().clone() for _, current in pairs]
        with torch.no_grad():
            for averaged, current in pairs:
                current.copy_(averaged)
        try:
            yield model
        finally:
            with torch.no_grad():
                for (_, current), original in zip(pairs, saved):
                    current.copy_(original)

    def state_dict(self) -> dict:
        """Decay, update count and the averaged weights, for checkpoints."""
        return {"decay": self.decay, "num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.module.load_state_dict(state["module"])
