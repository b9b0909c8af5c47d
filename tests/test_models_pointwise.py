"""The 1x1 convolution as a matrix product, against F.conv2d (float64), and where it is taken."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openalign.models.pointwise import matmul_conv2d, pointwise_conv2d


def test_the_matrix_product_equals_the_convolution_with_its_gradients():
    generator = torch.Generator().manual_seed(0)
    for size in (1, 3, 5):
        x = torch.randn(4, 6, size, size + 2, dtype=torch.float64, generator=generator)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        weight = torch.randn(10, 6, 1, 1, dtype=torch.float64, generator=generator, requires_grad=True)
        bias = torch.randn(10, dtype=torch.float64, generator=generator, requires_grad=True)
        output, expected = matmul_conv2d(x, weight, bias), F.conv2d(x, weight, bias)
        assert output.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)
        grad_output = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
        for got, want in zip(torch.autograd.grad(output, (x, weight, bias), grad_output),
                             torch.autograd.grad(expected, (x, weight, bias), grad_output)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_product_only_in_reduced_precision_on_channels_last_activations():
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(16, 8, 1, 1, requires_grad=True)
    assert type(pointwise_conv2d(x, weight).grad_fn).__name__ == "ConvolutionBackward0"  # float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = pointwise_conv2d(x, weight)
        contiguous = pointwise_conv2d(x.contiguous(), weight)
    assert type(output.grad_fn).__name__ == "PermuteBackward0" and output.dtype == torch.bfloat16
    assert type(contiguous.grad_fn).__name__ == "ConvolutionBackward0"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.conv2d(x, weight)
    torch.testing.assert_close(output.float(), expected.float(), rtol=2e-2, atol=2e-2)
    bf16 = pointwise_conv2d(x.detach().bfloat16(), weight.detach().bfloat16())
    assert bf16.grad_fn is None and bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), expected.float(), rtol=2e-2, atol=2e-2)
