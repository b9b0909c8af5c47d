"""Squeeze-excite in fewer passes over the activation, for training as for inference.

Squeeze-excite scales each channel of an activation x (B, C, H, W) by a gate computed from its spatial mean:
y = x * gate(mean(x)). Autograd differentiates it as three separate operations: the product's two gradients
(g * gate, and (g * x) summed over space) and the mean's gradient, broadcast over the map and added to the
first in a further pass; the gate's two 1x1 convolutions run on (B, C, 1, 1) maps, where oneDNN's overhead
is most of their time. `squeeze_excite` computes the gate with matrix products on (B, C), and its backward
takes the input gradient in one pass, g * gate + (the mean's gradient) / (H * W), which is the only pass over
the activation besides the one that sums g * x. The gate's own small graph is rebuilt and differentiated by
autograd inside that backward, so any gate function works (docs/training.md, "The training step on a CPU", has
what it saves).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.autograd.function import once_differentiable

from openalign.models.utils import is_reduced_precision


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 1, 1), the squeeze of squeeze-excite.

    In bf16 / fp16 channels-last on CPU it is a batched matmul of a row of ones with the (B, H*W, C) view of
    `x`, divided by H*W: ATen's mean first converts the whole activation to float32 (a copy as large as the
    activation), and the product measured 2-4x faster on align-base's layers, about a seventh of the bf16
    image tower's eager time. float32 keeps ATen's mean (no copy there, and the same summation order as the
    plain model)."""
    batch, channels, height, width = x.shape
    reduced = is_reduced_precision(x.dtype)
    if not (reduced and x.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last)):
        return x.mean(dim=(2, 3), keepdim=True)
    rows = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # a view of channels-last memory
    ones = torch.ones(batch, 1, height * width, dtype=x.dtype, device=x.device)
    return torch.bmm(ones, rows).div_(height * width).view(batch, channels, 1, 1)


def squeeze_excite(x: torch.Tensor, gate: Callable[[torch.Tensor], torch.Tensor],
                   parameters: Sequence[torch.Tensor]) -> torch.Tensor:
    """x (B, C, H, W) times gate(spatial mean of x), per sample and channel. `gate` maps (B, C) to (B, C) and
    trains `parameters` (all the tensors it uses that may need gradients). Where autograd will differentiate
    the result it goes through the fused backward; otherwise (inference, torch.compile, which fuses on its
    own) it is the plain product."""
    batch, channels = x.shape[:2]
    needs_gradient = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in parameters))
    if needs_gradient and not torch.compiler.is_compiling():
        return _SqueezeExcite.apply(x, gate, *parameters)
    return x * gate(spatial_mean(x).view(batch, channels)).view(batch, channels, 1, 1)


class _SqueezeExcite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, *parameters):
        batch, channels = x.shape[:2]
        pooled = spatial_mean(x).view(batch, channels)
        scale = gate(pooled)  # (B, C)
        ctx.save_for_backward(x, pooled, scale)
        # The gate's small graph is rebuilt in backward, under the same autocast. Kept from here instead, its
        # saved tensors would be packed by gradient checkpointing's hooks (and unpacked by recomputing the whole
        # block), or, kept outside them, hold their own graph strongly and never be freed.
        ctx.gate, ctx.parameters = gate, parameters
        ctx.autocast = torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type)
        return x * scale.view(batch, channels, 1, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, pooled, scale = ctx.saved_tensors
        batch, channels, height, width = x.shape
        grad_scale = (grad_output * x).sum(dim=(2, 3))  # (B, C)
        parameters = ctx.parameters
        wanted = [p for p in parameters if p.requires_grad]
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            pooled = pooled.detach().requires_grad_()
            rebuilt = ctx.gate(pooled)
        grads = iter(torch.autograd.grad(rebuilt, [pooled, *wanted], grad_scale.to(rebuilt.dtype), allow_unused=True))
        grad_pooled = next(grads)
        grad_parameters = [next(grads) if p.requires_grad else None for p in parameters]
        grad_input = None
        if ctx.needs_input_grad[0]:
            # One pass: the product's gradient plus the mean's, spread evenly over the map. Written into x's
            # layout: addcmul would take the layout of its first, (B, C, 1, 1), argument.
            spread = (grad_pooled / (height * width)).to(grad_output.dtype).view(batch, channels, 1, 1)
            gate = scale.view(batch, channels, 1, 1).to(grad_output.dtype)
            grad_input = torch.addcmul(spread, grad_output, gate, out=torch.empty_like(x, dtype=grad_output.dtype))
        return (grad_input, None, *grad_parameters)
