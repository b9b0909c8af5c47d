"""The depthwise convolution of an MBConv block, with a weight gradient that stays fast on small feature maps.

On a CPU, oneDNN's weight gradient of a depthwise convolution whose kernel is wider than its feature map (a
5x5 kernel over the 4x4 and 2x2 maps of a small EfficientNet's last stages, a 3x3 one over 2x2) takes a path
10-50x slower than the rest of the layer: in the demo's training step those few layers held about half of
the whole backward pass (docs/training.md, "The training step on a CPU"). There the weight gradient is
summed here instead, one kernel tap at a time: a tap's gradient is the product of the input shifted by the
tap with the output gradient, summed over the batch and the positions where both exist, which touches no
padding at all. The forward pass and the input gradient are the convolution's own, so outputs are unchanged
and gradients agree to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int,
                     padding: tuple[int, int, int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H', W'): `weight` (C, 1, k, k) applied per channel with `stride`, after zero
    `padding` (left, right, top, bottom). Symmetric padding goes to the convolution itself, asymmetric
    padding is applied first, as `F.pad` would."""
    if _wants_tap_gradient(x, weight):
        return _DepthwiseConvolution.apply(x, weight, stride, padding)
    return _convolve(x, weight, stride, padding)


def _convolve(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: tuple[int, int, int, int]) -> torch.Tensor:
    source, convolution_padding = _padded(x, padding)
    return F.conv2d(source, weight, None, stride, convolution_padding, 1, weight.shape[0])


def _padded(x: torch.Tensor, padding: tuple[int, int, int, int]) -> tuple[torch.Tensor, int]:
    """(what the convolution reads, the padding it adds itself): symmetric padding is the convolution's,
    asymmetric padding a copy first."""
    left, right, top, bottom = padding
    if left == right == top == bottom:
        return x, left
    return F.pad(x, padding), 0


def _wants_tap_gradient(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The slow case (a CPU weight gradient, kernel wider than the map), outside autocast, whose casts the
    function would have to repeat."""
    kernel = weight.shape[-1]
    return (weight.requires_grad and torch.is_grad_enabled() and x.device.type == "cpu"
            and kernel > min(x.shape[-2:]) and not torch.is_autocast_enabled(x.device.type))


class _DepthwiseConvolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, stride, padding):
        source, convolution_padding = _padded(x, padding)
        ctx.save_for_backward(source, weight)
        ctx.stride, ctx.padding, ctx.convolution_padding = stride, padding, convolution_padding
        ctx.input_size = x.shape[-2:]
        return F.conv2d(source, weight, None, stride, convolution_padding, 1, weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        source, weight = ctx.saved_tensors
        stride, convolution_padding = ctx.stride, ctx.convolution_padding
        left, _, top, _ = ctx.padding
        height, width = ctx.input_size
        # Padded first (asymmetric): the input is a view of the padded copy, from (top, left).
        crop = (slice(None), slice(None), slice(top, top + height), slice(left, left + width))
        pre_padded = source.shape[-2:] != ctx.input_size
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.ops.aten.convolution_backward(
                grad_output, source, weight, None, [stride, stride], [convolution_padding] * 2, [1, 1], False,
                [0, 0], weight.shape[0], [True, False, False])[0]
            grad_input = grad_input[crop] if pre_padded else grad_input
        if ctx.needs_input_grad[1]:
            x = source[crop] if pre_padded else source
            grad_weight = tap_weight_gradient(x, grad_output, weight.shape[-1], stride, (top, left)).to(weight.dtype)
        return grad_input, grad_weight, None, None


def tap_weight_gradient(x: torch.Tensor, grad_output: torch.Tensor, kernel: int, stride: int,
                        offset: tuple[int, int]) -> torch.Tensor:
    """The depthwise convolution's weight gradient (C, 1, k, k), tap by tap: for tap (i, j), output position
    (h, w) reads input (stride * h + i - top, stride * w + j - left), where `offset` is (top, left), the
    padding before the input; only pairs inside the input count."""
    _, channels, height, width = x.shape
    out_height, out_width = grad_output.shape[-2:]
    top, left = offset
    # Channels last in both: each product below is a batch of channel vectors, summed over batch and space.
    inputs, grads = x.permute(0, 2, 3, 1), grad_output.permute(0, 2, 3, 1)  # (B, H, W, C), (B, H', W', C)
    gradient = x.new_zeros(kernel, kernel, channels)
    rows = [_overlap(i - top, stride, height, out_height) for i in range(kernel)]
    columns = [_overlap(j - left, stride, width, out_width) for j in range(kernel)]
    for i, row in enumerate(rows):
        for j, column in enumerate(columns):
            if row is None or column is None:
                continue
            products = inputs[:, row[1], column[1]] * grads[:, row[0], column[0]]  # (B, h, w, C)
            gradient[i, j] = products.sum((0, 1, 2))
    return gradient.permute(2, 0, 1).unsqueeze(1)  # (C, 1, k, k)


def _overlap(offset: int, stride: int, size: int, out_size: int) -> tuple[slice, slice] | None:
    """(output slice, input slice) of the outputs o that read an input stride * o + offset inside [0, size);
    None when no output does."""
    first = max(0, -(offset // stride))  # the smallest o with stride * o + offset >= 0
    last = min(out_size - 1, (size - 1 - offset) // stride)
    if first > last:
        return None
    return slice(first, last + 1), slice(stride * first + offset, stride * last + offset + 1, stride)
