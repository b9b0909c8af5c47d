"""Helpers for comparing openalign with transformers (the oracle) on random but meaningful weights."""

from __future__ import annotations

import torch
from torch import nn

from openalign.model_config import AlignConfig, AlignTextConfig, AlignVisionConfig
from openalign.models.utils import trainable_init


def randomise_batchnorm(model: nn.Module, generator: torch.Generator, spread: float = 0.5) -> nn.Module:
    """Random running statistics and affine parameters for every BatchNorm, so that an eval-mode path (folding
    them into the convolutions, a rank's eval step) is tested on something other than the identity, where
    initialisation leaves them (0 / 1): mean ~ N(0, spread / 2), variance ~ U(1 - spread, 1 + spread), weight
    scaled by U(1 - spread, 1 + spread), bias ~ N(0, spread / 4). Shared by the tests and benchmarks/_models.py."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                channels = module.num_features
                module.running_mean.copy_(torch.randn(channels, generator=generator) * spread / 2)
                module.running_var.copy_(1 - spread + torch.rand(channels, generator=generator) * 2 * spread)
                if module.affine:
                    module.weight.mul_(1 - spread + torch.rand(channels, generator=generator) * 2 * spread)
                    module.bias.copy_(torch.randn(channels, generator=generator) * spread / 4)
    return model


def randomize(model: nn.Module, seed: int = 0, residual_gain: float = 0.2) -> nn.Module:
    """Weights whose activations neither vanish nor explode through the whole trunk: kaiming convs, small gain
    on residual branches, random BatchNorm statistics and affine parameters, random LayerNorm affine."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    trainable_init(model, residual_gain=residual_gain)
    randomise_batchnorm(model, generator)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + torch.randn(m.weight.shape, generator=generator) * 0.1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.02)
        for name, p in model.named_parameters():
            if name == "temperature":
                p.fill_(0.3)
    return model


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, name: str = "") -> float:
    """Max abs difference within rtol of the tensor's scale (absolute where magnitudes are near 1).
    Also refuses to compare vanishing tensors, where any implementation would agree."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    assert scale > 1e-3, f"{name}: reference magnitude {scale} too small for a meaningful comparison"
    difference = (actual.double() - expected.double()).abs().max().item()
    assert difference <= rtol * max(1.0, scale), f"{name}: max abs diff {difference} at scale {scale}"
    return difference / max(1.0, scale)


def tiny_config(
    *,
    image_size: int = 32,
    width: float = 0.25,
    depth: float = 0.3,
    kernel_sizes=(3, 3, 5, 3, 5, 5, 3),
    strides=(1, 2, 2, 2, 1, 2, 1),
    depthwise_padding=(),
    pooling_type: str = "mean",
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 99,
    dropout: float = 0.0,
) -> AlignConfig:
    vision = AlignVisionConfig(
        image_size=image_size, width_coefficient=width, depth_coefficient=depth, kernel_sizes=list(kernel_sizes),
        strides=list(strides), depthwise_padding=list(depthwise_padding), pooling_type=pooling_type,
        hidden_dim=4096, drop_connect_rate=dropout,
    )
    text = AlignTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        intermediate_size=2 * hidden_size + 3, max_position_embeddings=40, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return AlignConfig(text_config=text, vision_config=vision, projection_dim=vision.output_channels)


def text_inputs(config: AlignConfig, batch_size: int, length: int, seed: int = 0, padded: bool = True):
    generator = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    input_ids = torch.randint(1, vocab, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    token_type_ids = torch.zeros_like(input_ids)
    if padded and batch_size > 1:
        for row in range(1, batch_size):
            keep = max(2, length - 2 * row)
            attention_mask[row, keep:] = 0
            input_ids[row, keep:] = 0
        token_type_ids[0, length // 2:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def pixel_inputs(config: AlignConfig, batch_size: int, seed: int = 0) -> torch.Tensor:
    size = config.vision_config.image_size
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))
