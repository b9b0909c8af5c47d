"""Exact gradient accumulation for contrastive losses by caching features (the "GradCache" method).

A contrastive loss over a batch of N pairs does not split into a sum of per-micro-batch losses (every pair is
a negative for every other), so plain accumulation changes the objective. Instead:

1. encode every micro-batch without gradient and cache the features;
2. compute the loss once on the concatenated features (gathered across ranks inside the loss, if any) and take
   its gradient with respect to the cached features and to the loss's own scalars (the temperature);
3. encode each micro-batch again, with gradient, and backpropagate the cached feature gradients through it.

The parameter gradients then equal those of one step on the whole batch, up to float rounding, provided the
encoder computes the same function in both passes and as on the full batch:
- dropout: the RNG state is saved before each micro-batch in pass 1 and restored before it in pass 2, so the
  masks are replayed. They differ from the masks of a single full-batch forward, so the gradient is exact for
  the per-micro-batch masks (and the RNG is left where pass 1 left it);
- BatchNorm in training mode normalises each micro-batch with its own statistics: exact with respect to
  per-micro-batch normalisation, not the full batch (use eval-mode BatchNorm, or none, for full-batch
  exactness). Running statistics are restored after pass 1, so they are updated once per micro-batch (in
  pass 2), not twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

Features = tuple[torch.Tensor, ...]


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda_states


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    cpu_state, cuda_states = state
    torch.set_rng_state(cpu_state)
    if cuda_states is not None:
        torch.cuda.set_rng_state_all(cuda_states)


def _norm_buffers(model: nn.Module | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) for every BatchNorm running statistic, to undo pass 1's updates."""
    if model is None:
        return []
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for buffer in (module.running_mean, module.running_var, module.num_batches_tracked):
                if buffer is not None:
                    saved.append((buffer, buffer.detach().clone()))
    return saved


def _as_tuple(outputs: Any) -> Features:
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    if not outputs or not all(isinstance(output, torch.Tensor) for output in outputs):
        raise TypeError(f"encode must return a tensor or a tuple of tensors, got {type(outputs).__name__}")
    return outputs


def accumulated_step(
    encode: Callable[[Any], Features],
    loss_fn: Callable[..., torch.Tensor],
    micro_batches: Sequence[Any],
    loss_parameters: Sequence[torch.Tensor] = (),
    model: nn.Module | None = None,
) -> torch.Tensor:
    """Accumulate into ``.grad`` the gradient of ``loss_fn`` over all ``micro_batches`` at once; return the loss.

    ``encode(micro_batch)`` runs the model and returns its features, e.g. ``(image_features, text_features)``,
    each (b, D). Under DDP it must call the DDP-wrapped model (not ``model.module``), so that the last
    micro-batch's backward reduces the gradients. ``loss_fn(*features)`` takes the concatenated features, each
    (k * b, D), and returns the scalar loss; it may gather across ranks and close over the temperature.
    ``loss_parameters``: the tensors ``loss_fn`` uses that need gradients (the temperature, a logit bias);
    their gradients are injected into the last micro-batch's backward so DDP reduces them with the rest.
    ``model``: the (possibly DDP-wrapped) model; gives ``no_sync`` for all micro-batches but the last and the
    BatchNorm buffers to restore after pass 1. Gradients are accumulated, not overwritten: zero them before.
    """
    if len(micro_batches) == 0:
        raise ValueError("micro_batches is empty: nothing to accumulate")
    loss_parameters = list(loss_parameters)

    # Pass 1: features of every micro-batch, no graph kept.
    saved_norm_buffers = _norm_buffers(model)
    rng_states, cached = [], []
    with torch.no_grad():
        for micro_batch in micro_batches:
            rng_states.append(_rng_state())
            cached.append(_as_tuple(encode(micro_batch)))
    rng_after_pass1 = _rng_state()
    with torch.no_grad():
        for buffer, copy in saved_norm_buffers:
            buffer.copy_(copy)
    num_outputs = len(cached[0])
    if any(len(outputs) != num_outputs for outputs in cached):
        raise ValueError(f"encode returned {sorted({len(outputs) for outputs in cached})} outputs across batches")

    # The loss on the whole batch, differentiated with respect to the cached features and the loss's scalars.
    leaves = [torch.cat([outputs[i] for outputs in cached]).requires_grad_(True) for i in range(num_outputs)]
    loss = loss_fn(*leaves)
    gradients = torch.autograd.grad(loss, leaves + loss_parameters, allow_unused=True)
    feature_gradients, parameter_gradients = gradients[:num_outputs], gradients[num_outputs:]
    sizes = [outputs[0].shape[0] for outputs in cached]
    per_batch = [
        torch.zeros_like(leaf).split(sizes) if gradient is None else gradient.split(sizes)
        for leaf, gradient in zip(leaves, feature_gradients)
    ]  # per output: k tensors (b, D)

    # Pass 2: re-encode with the same RNG and push the cached gradients through the encoder.
    no_sync = getattr(model, "no_sync", None)
    for index, micro_batch in enumerate(micro_batches):
        is_last = index == len(micro_batches) - 1
        context = no_sync() if (no_sync is not None and not is_last) else contextlib.nullcontext()
        _set_rng_state(rng_states[index])
        with context:
            outputs = _as_tuple(encode(micro_batch))
            # A frozen tower's features carry no graph: nothing to push through them.
            kept = [i for i, output in enumerate(outputs) if output.requires_grad]
            tensors = [outputs[i] for i in kept]
            grads = [per_batch[i][index] for i in kept]
            if is_last:
                # A backward through a leaf accumulates its gradient and fires DDP's hook, so the scalars are
                # reduced with the rest of the model (a parameter outside DDP just accumulates).
                for parameter, gradient in zip(loss_parameters, parameter_gradients):
                    if gradient is not None:
                        tensors.append(parameter)
                        grads.append(gradient)
            if tensors:
                torch.autograd.backward(tensors, grads)
    _set_rng_state(rng_after_pass1)
    return loss.detach()


def split_batch(batch: Sequence[torch.Tensor], num_micro_batches: int) -> list[tuple[torch.Tensor, ...]]:
    """Split aligned tensors (each (B, ...)) into ``num_micro_batches`` tuples of (B / k, ...) slices."""
    batch_size = batch[0].shape[0]
    if num_micro_batches < 1 or batch_size % num_micro_batches:
        raise ValueError(f"batch size {batch_size} does not split into {num_micro_batches} equal micro-batches")
    chunks = [tensor.chunk(num_micro_batches) for tensor in batch]
    return list(zip(*chunks))
