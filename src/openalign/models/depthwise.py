"""The depthwise convolution of an MBConv block, with gradients that stay fast where oneDNN's are slow.

On a CPU, oneDNN's backward of a depthwise convolution has slow paths that the demo's small EfficientNet
reaches (docs/training.md, "The training step on a CPU", measured at batch 384):

- the weight gradient where the kernel is wider than the feature map (a 5x5 kernel over the 4x4 and 2x2 maps
  of the last stages, a 3x3 one over 2x2): 10-50x slower than the rest of the layer. There the weight
  gradient is summed here, one kernel tap at a time: a tap's gradient is the product of the input shifted by
  the tap with the output gradient, summed over the batch and the positions where both exist, which touches no
  padding at all;
- in bfloat16 (autocast on a CPU with native bfloat16), the input gradient of a strided convolution, 10-300x
  slower than the forward pass, and the weight gradient of 5x5 kernels, 3-5x slower than in float32. There the
  input gradient is the transposed convolution written as a stride-1 one (the output gradient spread onto the
  input grid with zeros between, convolved with the flipped kernel: the fast kernel of the forward pass), and
  the weight gradient of a stride-1 kernel wider than 3x3 is taken in float32;
- the weight gradient of a strided 5x5 kernel, slow in both precisions: it is split into the stride x stride
  phases of the input, each a stride-1 gradient of a kernel of at most 3x3 (2.5x faster in bfloat16, 1.5x in
  float32, at the demo's 16x16 map).

The forward pass is the convolution's own, so outputs are unchanged and gradients agree with autograd's to
float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from openalign.models.utils import is_reduced_precision


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int,
                     padding: tuple[int, int, int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H', W'): `weight` (C, 1, k, k) applied per channel with `stride`, after zero
    `padding` (left, right, top, bottom). Symmetric padding goes to the convolution itself, asymmetric
    padding is applied first, as `F.pad` would. Under autocast both are cast to its dtype, as `F.conv2d` would
    be."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        with torch.autocast("cpu", enabled=False):
            return depthwise_conv2d(x.to(dtype), weight.to(dtype), stride, padding)
    if _wants_own_backward(x, weight, stride):
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


def _wants_own_backward(x: torch.Tensor, weight: torch.Tensor, stride: int) -> bool:
    """A CPU convolution that autograd will differentiate through one of oneDNN's slow cases: a weight gradient
    with the kernel wider than the map, or any gradient in reduced precision (see the module's docstring)."""
    if x.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    if is_reduced_precision(x.dtype):
        return x.requires_grad and stride > 1 or weight.requires_grad
    return weight.requires_grad and (_kernel_wider_than_map(weight, x) or _strided_wide_kernel(weight, stride))


def _kernel_wider_than_map(weight: torch.Tensor, x: torch.Tensor) -> bool:
    return weight.shape[-1] > min(x.shape[-2:])


def _strided_wide_kernel(weight: torch.Tensor, stride: int) -> bool:
    """A strided convolution whose kernel is wider than 3x3: its weight gradient is taken phase by phase."""
    return stride > 1 and weight.shape[-1] > 3


class _DepthwiseConvolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, stride, padding):
        source, convolution_padding = _padded(x, padding)
        ctx.save_for_backward(source, weight)
        ctx.stride, ctx.padding, ctx.convolution_padding = stride, padding, convolution_padding
        ctx.input_size = x.shape[-2:]
        ctx.tap_gradient = _kernel_wider_than_map(weight, x)
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
        reduced = is_reduced_precision(source.dtype)
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            if reduced and stride > 1:
                grad_input = transposed_as_stride_one(grad_output, weight, stride, convolution_padding,
                                                      source.shape[-2:])
            else:
                grad_input = torch.ops.aten.convolution_backward(
                    grad_output, source, weight, None, [stride, stride], [convolution_padding] * 2, [1, 1],
                    False, [0, 0], weight.shape[0], [True, False, False])[0]
            grad_input = grad_input[crop] if pre_padded else grad_input
        if ctx.needs_input_grad[1]:
            kernel = weight.shape[-1]
            if ctx.tap_gradient:
                x = source[crop] if pre_padded else source
                grad_weight = tap_weight_gradient(x, grad_output, kernel, stride, (top, left))
            elif _strided_wide_kernel(weight, stride):
                padded = F.pad(source, (convolution_padding,) * 4) if convolution_padding else source
                grad_weight = phase_weight_gradient(grad_output, padded, weight, stride)
            else:
                # oneDNN's reduced-precision weight gradient of kernels wider than 3x3 is the slow one; converting
                # both operands to float32 costs less there (and more for 3x3 kernels).
                upcast = reduced and kernel > 3
                grad_weight = torch.ops.aten.convolution_backward(
                    grad_output.float() if upcast else grad_output, source.float() if upcast else source,
                    weight.float() if upcast else weight, None, [stride, stride], [convolution_padding] * 2,
                    [1, 1], False, [0, 0], weight.shape[0], [False, True, False])[1]
            grad_weight = grad_weight.to(weight.dtype)
        return grad_input, grad_weight, None, None


def phase_weight_gradient(grad_output: torch.Tensor, padded: torch.Tensor, weight: torch.Tensor,
                          stride: int) -> torch.Tensor:
    """The weight gradient (C, 1, k, k) of `F.conv2d(padded, weight, None, stride, 0, 1, C)` as stride x stride
    gradients of stride-1 convolutions with kernels of about k / stride: tap (stride * a + r, stride * b + t)
    reads padded[stride * (o + a) + r, stride * (p + b) + t] for output (o, p), which is tap (a, b) of a
    stride-1 convolution over the phase padded[r::stride, t::stride] with the kernel's taps [r::stride,
    t::stride]. oneDNN's gradients of those small kernels are the fast ones."""
    channels, out_height, out_width = grad_output.shape[1:]
    kernel = weight.shape[-1]
    layout = torch.channels_last if _channels_last(padded) else torch.contiguous_format
    gradient = weight.new_empty(weight.shape, dtype=grad_output.dtype)
    for row in range(min(stride, kernel)):
        for column in range(min(stride, kernel)):
            taps = weight[:, :, row::stride, column::stride]  # (C, 1, rows, columns), read for its shape
            phase = padded[:, :, row::stride, column::stride][
                :, :, : out_height + taps.shape[-2] - 1, : out_width + taps.shape[-1] - 1]
            gradient[:, :, row::stride, column::stride] = torch.ops.aten.convolution_backward(
                grad_output, phase.contiguous(memory_format=layout), taps, None, [1, 1], [0, 0], [1, 1], False,
                [0, 0], channels, [False, True, False])[1]
    return gradient


def transposed_as_stride_one(grad_output: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
                             input_size: tuple[int, int]) -> torch.Tensor:
    """The input gradient (B, C, H, W) of `F.conv2d(x, weight, None, stride, padding, 1, C)` for an input of
    `input_size` (H, W), as a stride-1 depthwise convolution: input position p (in the padded input) received
    weight[i] * grad_output[o] from every output o and tap i with stride * o + i = p, which is the output
    gradient placed at every stride-th position of a zero grid (`spread`) convolved with the flipped kernel.
    Padding that grid by k - 1 - padding on each side makes the result start at the first unpadded row."""
    batch, channels, out_height, out_width = grad_output.shape
    kernel = weight.shape[-1]
    height, width = input_size
    # The grid holds every output's first tap: stride * (out - 1) + 1 <= height + 2 * padding - kernel + 1.
    spread = torch.empty((batch, channels, height + 2 * padding - kernel + 1, width + 2 * padding - kernel + 1),
                         dtype=grad_output.dtype, device=grad_output.device,
                         memory_format=torch.channels_last if _channels_last(grad_output) else torch.contiguous_format)
    spread.zero_()
    spread[:, :, : stride * out_height : stride, : stride * out_width : stride] = grad_output
    return F.conv2d(spread, weight.flip(-2, -1), None, 1, kernel - 1 - padding, 1, channels)


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


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
