"""Small pieces shared by both towers."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


class GELUTanh(nn.GELU):
    def __init__(self):
        super().__init__(approximate="tanh")


_ACTIVATIONS = {
    "gelu": nn.GELU,  # erf GELU, as BERT
    "gelu_new": GELUTanh,
    "gelu_pytorch_tanh": GELUTanh,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}


def is_reduced_precision(dtype: torch.dtype) -> bool:
    """bfloat16 or float16: the dtypes whose CPU kernels the towers route around where oneDNN's are slow."""
    return dtype in (torch.bfloat16, torch.float16)


def activation(name: str) -> nn.Module:
    """An activation module by its transformers name."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}") from None


@contextlib.contextmanager
def no_batchnorm_update(module: nn.Module):
    """Run training-mode BatchNorm without touching running statistics (momentum 0 leaves them as they are).

    Used when a forward pass is repeated (gradient checkpointing, feature caching), so a batch is counted once.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class CheckpointingTower:
    """Gradient-checkpointing switches (transformers' names) for a tower whose `encoder` has the flag."""

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each layer's activations in the backward pass."""
        self.encoder.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.encoder.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def normal_init(module: nn.Module, std: float) -> None:
    """transformers' default initialisation: normal(0, std) for linear, conv and embedding weights, zero biases,
    unit norms, reset BatchNorm statistics."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()


def trainable_init(module: nn.Module, residual_gain: float = 0.2) -> None:
    """An initialisation that keeps a deep EfficientNet trunk alive when training from scratch.

    transformers' normal(0, 0.02) makes EfficientNet activations vanish after a few blocks. Here convs get
    kaiming fan-in normal init, and the last BatchNorm of every residual branch a small
    gain, so that 50+ blocks neither vanish nor explode. Text layers keep the BERT init.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            m.reset_running_stats()
    for m in module.modules():
        spec = getattr(m, "spec", None)
        if spec is not None and getattr(spec, "residual", False):
            nn.init.constant_(m.projection.project_bn.weight, residual_gain)
