"""The fused squeeze-excite against autograd through the plain formula (float64), and under bfloat16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from openalign.model_config import AlignVisionConfig
from openalign.models.efficientnet import SqueezeExcite
from openalign.models.fused import squeeze_excite


def plain_squeeze_excite(module: SqueezeExcite, x: torch.Tensor) -> torch.Tensor:
    """What squeeze-excite computed before it was fused: 1x1 convolutions on the (B, C, 1, 1) means."""
    gate = x.mean(dim=(2, 3), keepdim=True)
    return x * torch.sigmoid(module.expand(module.act_reduce(module.reduce(gate))))


def randomised(channels: int, dtype=torch.float64) -> SqueezeExcite:
    module = SqueezeExcite(channels, 8, AlignVisionConfig()).to(dtype)
    generator = torch.Generator().manual_seed(channels)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=dtype))
    return module


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [1, 3, 6])
def test_output_and_every_gradient_equal_autograd(channels_last, size):
    module = randomised(24)
    generator = torch.Generator().manual_seed(size)
    x = torch.randn(5, 24, size, size + 1, dtype=torch.float64, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    output = module(x)
    assert type(output.grad_fn).__name__ == "_SqueezeExciteBackward"
    expected = plain_squeeze_excite(module, x)
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)
    grad_output = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    inputs = (x, *module.parameters())
    for got, want in zip(torch.autograd.grad(output, inputs, grad_output),
                         torch.autograd.grad(expected, inputs, grad_output)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if channels_last and size > 1:  # the input gradient keeps the activation's layout
        grad_input = torch.autograd.grad(module(x), x, grad_output)[0]
        assert grad_input.is_contiguous(memory_format=torch.channels_last)


def test_a_frozen_input_or_gate_gets_no_gradient_and_no_grad_is_the_plain_product():
    module = randomised(16)
    x = torch.randn(3, 16, 4, 4, dtype=torch.float64)
    output = module(x)  # x needs no gradient, the gate's parameters do
    grads = torch.autograd.grad(output.sum(), list(module.parameters()))
    expected = torch.autograd.grad(plain_squeeze_excite(module, x).sum(), list(module.parameters()))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    module.expand.bias.requires_grad_(False)
    x.requires_grad_()
    grads = torch.autograd.grad(module(x).sum(), [x, module.reduce.weight])
    torch.testing.assert_close(grads[0], torch.autograd.grad(plain_squeeze_excite(module, x).sum(), x)[0])
    with torch.no_grad():
        plain = module(x)
    assert plain.grad_fn is None
    torch.testing.assert_close(plain, plain_squeeze_excite(module, x))


def test_bfloat16_autocast_gradients_as_close_to_float64_as_autograds():
    module = randomised(32, torch.float32)
    generator = torch.Generator().manual_seed(3)
    # bfloat16 as the BatchNorm before it gives it under autocast.
    x = torch.randn(8, 32, 5, 5, generator=generator).bfloat16()
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    grad_output = torch.randn(8, 32, 5, 5, generator=generator).bfloat16()
    inputs = (x, *module.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, plain = module(x), plain_squeeze_excite(module, x)
    assert output.dtype == plain.dtype == torch.bfloat16
    ours = torch.autograd.grad(output, inputs, grad_output)
    theirs = torch.autograd.grad(plain, inputs, grad_output)
    double = randomised(32)
    with torch.no_grad():
        for target, source in zip(double.parameters(), module.parameters()):
            target.copy_(source.bfloat16().double())  # the weights autocast multiplies with
    x64 = x.detach().double().requires_grad_()
    truth = torch.autograd.grad(plain_squeeze_excite(double, x64), (x64, *double.parameters()),
                                grad_output.double())
    for got, reference, want in zip(ours, theirs, truth):
        error = float((got.double() - want).abs().max() / want.abs().max())
        their_error = float((reference.double() - want).abs().max() / want.abs().max())
        assert error <= max(2 * their_error, 2**-7), (error, their_error)


def test_the_gate_is_any_function_of_the_means():
    """squeeze_excite differentiates whatever gate it is given (here one with a single parameter)."""
    weight = torch.randn(6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)

    def gate(pooled):
        return torch.tanh(pooled * weight)

    output = squeeze_excite(x, gate, [weight])
    expected = x * torch.tanh(x.mean(dim=(2, 3)) * weight)[:, :, None, None]
    grad_output = torch.randn(x.shape, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(output, (x, weight), grad_output),
                         torch.autograd.grad(expected, (x, weight), grad_output)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert F.mse_loss(output, expected) < 1e-24


def test_backward_twice_through_a_retained_graph():
    module = randomised(8)
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    output = module(x).square().sum()
    first = torch.autograd.grad(output, x, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(output, x)[0], first, rtol=0, atol=0)


def test_nothing_outlives_a_step():
    """Every tensor of a forward and backward is freed with its graph (a kept gate graph once held itself)."""
    import gc

    module = randomised(16, torch.float32)

    def live_tensors():
        gc.collect()
        return sum(1 for thing in gc.get_objects() if torch.is_tensor(thing))

    def step():
        x = torch.randn(4, 16, 3, 3, requires_grad=True)
        module(x * 2).sum().backward()

    step()
    before = live_tensors()
    for _ in range(3):
        step()
    assert live_tensors() == before
