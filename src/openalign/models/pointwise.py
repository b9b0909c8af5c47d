"""The 1x1 convolutions of an MBConv block (expansion and projection) as matrix products in reduced precision.

A 1x1 convolution over a channels-last activation (B, C, H, W) is a matrix product of its (B * H * W, C) rows
with the (C_out, C) weight, and the rows are already laid out so in memory. In float32 oneDNN's convolution is
as fast as the product or faster, but in bfloat16 on a CPU its forward and backward on the small maps of an
EfficientNet's later stages carry an overhead that the product does not (docs/training.md, "The training step
on a CPU"); there `pointwise_conv2d` takes the product, through autograd's own `linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openalign.models.utils import is_reduced_precision


def pointwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.conv2d(x, weight, bias)` for a (C_out, C, 1, 1) `weight`; as a matrix product on the channels-last
    rows of `x` where the convolution would run in bfloat16 or float16 on a CPU (under autocast, or in that
    dtype), the same convolution otherwise."""
    if not _reduced_precision_on_cpu(x) or not x.is_contiguous(memory_format=torch.channels_last):
        return F.conv2d(x, weight, bias)
    return matmul_conv2d(x, weight, bias)


def matmul_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The 1x1 convolution as `linear` on the (B, H, W, C) view of `x`; the result is a channels-last view."""
    rows = x.permute(0, 2, 3, 1)  # (B, H, W, C): a view of channels-last memory
    return F.linear(rows, weight.flatten(1), bias).permute(0, 3, 1, 2)  # (B, C_out, H, W), channels-last


def _reduced_precision_on_cpu(x: torch.Tensor) -> bool:
    if x.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu"):
        return is_reduced_precision(torch.get_autocast_dtype("cpu"))
    return is_reduced_precision(x.dtype)
