"""The depthwise convolution's own weight gradient against autograd through F.pad + F.conv2d (float64)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from openalign.models.depthwise import depthwise_conv2d, phase_weight_gradient, transposed_as_stride_one


def padding_of(kernel: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Symmetric 'same' padding, and the asymmetric kinds EfficientNet's stride-2 blocks use."""
    half = kernel // 2
    return [(half,) * 4, (half - 1, half, half - 1, half), (half, half + 1, half - 1, half)][: 3 if stride == 2 else 2]


SHAPES = itertools.product((1, 2, 3, 5), (3, 5), (1, 2))  # map size, kernel, stride
CASES = [(size, kernel, stride, padding) for size, kernel, stride in SHAPES for padding in padding_of(kernel, stride)
         if size + padding[2] + padding[3] >= kernel]  # the padded map holds the kernel


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_equal_autograd_through_pad_and_conv(channels_last):
    generator = torch.Generator().manual_seed(0)
    custom = 0
    for size, kernel, stride, padding in CASES:
        x = torch.randn(3, 5, size, size + 1, dtype=torch.float64, generator=generator)
        weight = torch.randn(5, 1, kernel, kernel, dtype=torch.float64, generator=generator)
        if channels_last:
            x, weight = (t.contiguous(memory_format=torch.channels_last) for t in (x, weight))
        x.requires_grad_()
        weight.requires_grad_()
        expected = F.conv2d(F.pad(x, padding), weight, None, stride, 0, 1, 5)
        output = depthwise_conv2d(x, weight, stride, padding)
        custom += type(output.grad_fn).__name__.startswith("_DepthwiseConvolution")
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-12)
        grad_output = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
        expected_grads = torch.autograd.grad(expected, (x, weight), grad_output)
        grads = torch.autograd.grad(output, (x, weight), grad_output)
        for name, got, want in zip(("input", "weight"), grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12,
                                       msg=f"{name} gradient, size {size} kernel {kernel} stride {stride} {padding}")
    # The kernel is wider than the map in these (the tap-by-tap weight gradient), or a strided kernel wider than
    # 3x3 (phase by phase).
    assert custom == sum(kernel > size or (stride > 1 and kernel > 3) for size, kernel, stride, _ in CASES) > 10


def test_plain_convolution_where_the_map_is_wider_than_the_kernel_or_without_gradient():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    weight = torch.randn(4, 1, 3, 3, requires_grad=True)
    assert type(depthwise_conv2d(x, weight, 1, (1,) * 4).grad_fn).__name__ == "ConvolutionBackward0"
    small = torch.randn(2, 4, 2, 2, requires_grad=True)
    with torch.no_grad():
        assert depthwise_conv2d(small, weight, 1, (1,) * 4).grad_fn is None
    frozen = weight.detach()
    assert type(depthwise_conv2d(small, frozen, 1, (1,) * 4).grad_fn).__name__ == "ConvolutionBackward0"


def test_input_gradient_as_a_stride_one_convolution_equals_autograd():
    """The transposed convolution written as a stride-1 one, against autograd's input gradient (float64),
    for every case above, with the padding in the convolution or (asymmetric) applied before it."""
    generator = torch.Generator().manual_seed(1)
    for size, kernel, stride, padding in CASES:
        x = torch.randn(2, 4, size, size + 1, dtype=torch.float64, generator=generator)
        weight = torch.randn(4, 1, kernel, kernel, dtype=torch.float64, generator=generator)
        symmetric = len(set(padding)) == 1
        source = x if symmetric else F.pad(x, padding)
        source.requires_grad_()
        convolution_padding = padding[0] if symmetric else 0
        output = F.conv2d(source, weight, None, stride, convolution_padding, 1, 4)
        grad_output = torch.randn(output.shape, dtype=torch.float64, generator=generator)
        expected, = torch.autograd.grad(output, source, grad_output)
        got = transposed_as_stride_one(grad_output, weight, stride, convolution_padding, source.shape[-2:])
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12,
                                   msg=f"size {size} kernel {kernel} stride {stride} {padding}")


def test_bfloat16_autocast_takes_the_fast_gradients_and_stays_exact_to_its_rounding():
    """Under CPU autocast the convolution runs in bfloat16 through its own backward (strided input gradients
    and weight gradients), with gradients as close to float64's as autograd's own bfloat16 convolution."""
    generator = torch.Generator().manual_seed(2)
    for size, kernel, stride, padding in [(9, 3, 2, (0, 1, 0, 1)), (8, 5, 2, (1, 2, 1, 2)), (4, 5, 1, (2,) * 4),
                                          (8, 3, 1, (1,) * 4)]:
        x = torch.randn(6, 16, size, size, generator=generator).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(16, 1, kernel, kernel, generator=generator)
        # Inputs exact in bfloat16, so float64 on them is the truth both bfloat16 paths round.
        x, weight = x.bfloat16().float().requires_grad_(), weight.bfloat16().float().requires_grad_()
        grad_output = torch.randn(6, 16, *F.conv2d(F.pad(x, padding), weight, None, stride, 0, 1, 16).shape[-2:],
                                  generator=generator)
        truth = torch.autograd.grad(F.conv2d(F.pad(x.double(), padding), weight.double(), None, stride, 0, 1, 16),
                                    (x, weight), grad_output.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = depthwise_conv2d(x, weight, stride, padding)
            plain = F.conv2d(F.pad(x, padding), weight, None, stride, 0, 1, 16)
        assert output.dtype == torch.bfloat16
        assert type(output.grad_fn).__name__.startswith("_DepthwiseConvolution")
        ours = torch.autograd.grad(output, (x, weight), grad_output.bfloat16())
        theirs = torch.autograd.grad(plain, (x, weight), grad_output.bfloat16())
        for name, got, reference, want in zip(("input", "weight"), ours, theirs, truth):
            error = float((got.double() - want).abs().max() / want.abs().max())
            their_error = float((reference.double() - want).abs().max() / want.abs().max())
            assert error <= max(2 * their_error, 2**-8), (name, size, kernel, stride, error, their_error)


@pytest.mark.parametrize("channels_last", [False, True])
def test_weight_gradient_phase_by_phase_equals_autograd(channels_last):
    """Strides 2 and 3, kernels 3 and 5, maps of several sizes (odd ones leave a phase a row shorter)."""
    generator = torch.Generator().manual_seed(3)
    for stride, kernel, size in itertools.product((2, 3), (3, 5), (5, 8, 9, 12)):
        padded = torch.randn(3, 4, size, size + 1, dtype=torch.float64, generator=generator)
        weight = torch.randn(4, 1, kernel, kernel, dtype=torch.float64, generator=generator, requires_grad=True)
        if channels_last:
            padded = padded.contiguous(memory_format=torch.channels_last)
        output = F.conv2d(padded, weight, None, stride, 0, 1, 4)
        grad_output = torch.randn(output.shape, dtype=torch.float64, generator=generator)
        expected, = torch.autograd.grad(output, weight, grad_output)
        torch.testing.assert_close(phase_weight_gradient(grad_output, padded, weight, stride), expected,
                                   rtol=1e-10, atol=1e-12, msg=f"stride {stride} kernel {kernel} size {size}")
