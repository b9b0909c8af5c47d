"""Optimisers (LAMB, AdamW), weight-decay parameter groups, and tower freezing (LiT).

LAMB is written here rather than taken from a package: it is thirty lines, the maintained implementations
differ in exactly the choices that matter (bias correction, whether excluded parameters are layer-adapted,
trust-ratio clipping), and none of them is a dependency of this project. The choices here follow the
TensorFlow LAMB that the ALIGN/BERT references trained with:

- Adam moments with bias correction (``bias_correction=True``);
- decoupled weight decay added to the Adam direction before the trust ratio: u = m_hat / (sqrt(v_hat) + eps)
  + weight_decay * p;
- trust ratio ||p|| / ||u|| per parameter tensor, 1 when either norm is zero, optionally capped at
  ``max_trust_ratio`` (the paper's clipping function phi; the TF reference does not cap, nor do we by default);
- layer adaptation only in groups with weight decay (TF's ``exclude_from_layer_adaptation`` defaults to the
  weight-decay exclusions): biases, norm parameters and the temperature take plain Adam steps.
"""

from __future__ import annotations

import types
from collections.abc import Iterable

import torch
from torch import nn

from openalign.errors import ConfigError


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning"): Adam with a per-tensor trust ratio.

    Per group: ``layer_adaptation`` (default: weight_decay > 0) turns the trust ratio on or off.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        max_trust_ratio: float | None = None,
        layer_adaptation: bool | None = None,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ConfigError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ConfigError(f"betas must be in [0, 1), got {betas}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
            max_trust_ratio=max_trust_ratio, layer_adaptation=layer_adaptation,
        )  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One LAMB update of every parameter with a gradient; returns the closure's loss, if one is given.

        Each formula runs once over all of a group's tensors (torch._foreach_*), not once per tensor: a
        model's hundreds of small tensors otherwise cost one dispatch each per formula."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            parameters = [parameter for parameter in group["params"] if parameter.grad is not None]
            if parameters:
                self._update(group, parameters)
        return loss

    def _update(self, group: dict, parameters: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        adapt = group["layer_adaptation"]
        adapt = group["weight_decay"] > 0 if adapt is None else adapt
        grads = [parameter.grad for parameter in parameters]
        if any(grad.is_sparse for grad in grads):
            raise RuntimeError("Lamb does not support sparse gradients")
        states = [self.state[parameter] for parameter in parameters]
        for parameter, state in zip(parameters, states):
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(parameter)
                state["exp_avg_sq"] = torch.zeros_like(parameter)
            state["step"] += 1
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        if group["bias_correction"]:  # per tensor: one that had no gradient in a step has taken fewer
            exp_avgs = torch._foreach_div(exp_avgs, [1 - beta1 ** state["step"] for state in states])
            exp_avg_sqs = torch._foreach_div(exp_avg_sqs, [1 - beta2 ** state["step"] for state in states])
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denominators, group["eps"])
        updates = torch._foreach_div(exp_avgs, denominators)  # m_hat / (sqrt(v_hat) + eps)
        if group["weight_decay"] > 0:
            torch._foreach_add_(updates, parameters, alpha=group["weight_decay"])
        if adapt:
            parameter_norms = torch.stack(torch._foreach_norm(parameters))
            update_norms = torch.stack(torch._foreach_norm(updates))
            ratios = parameter_norms / update_norms
            if group["max_trust_ratio"] is not None:
                ratios = ratios.clamp(max=group["max_trust_ratio"])
            # A zero norm (a freshly zeroed weight, a zero update) falls back to the plain Adam step.
            ratios = torch.where((parameter_norms > 0) & (update_norms > 0), ratios, 1.0)
            torch._foreach_mul_(updates, list(ratios.unbind()))
        torch._foreach_add_(parameters, updates, alpha=-group["lr"])


class AdamW(torch.optim.AdamW):
    """torch's AdamW, whose fused kernel (`fused=True`: an update in one pass over each tensor, a fifth of the
    for-loop's time for efficientnet-b0 + bert-mini on a CPU, docs/training.md) is given gradients laid out
    as their parameters are. The CPU kernel walks the memory of a parameter and of its gradient in step, so
    a gradient of other strides (a contiguous gradient of a channels-last weight, set by hand) would update
    the wrong elements without an error; such a gradient is copied into its parameter's layout first."""

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW update (see torch.optim.AdamW.step)."""
        if self.defaults.get("fused"):
            for group in self.param_groups:
                for parameter in group["params"]:
                    grad = parameter.grad
                    if grad is not None and grad.stride() != parameter.stride():
                        parameter.grad = torch.empty_like(parameter).copy_(grad)
        return super().step(closure)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: tensors of 2 or more dimensions decay; those of 0 or 1 do not.

    ndim <= 1 covers every bias, every norm scale and shift (BatchNorm, LayerNorm) and the 0-d temperature
    (or logit scale and bias): decaying them would pull the normalisation and the softmax sharpness towards
    zero rather than regularise the weights. Frozen parameters (requires_grad False) are left out, so freeze
    towers before building the optimiser. To train a loss's own scalars too, pass
    ``nn.ModuleList([model, loss])``.
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
) -> torch.optim.Optimizer:
    """ "lamb" (ALIGN's: lr 1e-3, weight decay 1e-5) or "adamw", over ``param_groups(model, weight_decay)``."""
    groups = param_groups(model, weight_decay)
    if name == "lamb":
        # The trust ratio follows the grouping, not the decay value: a run without decay still adapts weights.
        groups[0]["layer_adaptation"], groups[1]["layer_adaptation"] = True, False
        return Lamb(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        # The fused kernel takes plain tensors on a CPU or a CUDA device, not FSDP's shards.
        fused = all(type(parameter) in (torch.Tensor, nn.Parameter) and parameter.device.type in ("cpu", "cuda")
                    for group in groups for parameter in group["params"])
        return AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None)
    raise ConfigError(f"unknown optimizer {name!r}; choose 'lamb' or 'adamw'")


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def freeze_tower(model: nn.Module, tower: str) -> nn.Module:
    """Freeze the submodule named ``tower`` (e.g. "vision_model" for LiT); return it.

    Its parameters stop requiring gradients, and it stays in eval mode even when ``model.train()`` is called
    (its ``train`` is replaced for this instance), so BatchNorm keeps its running statistics and dropout is
    off, as LiT locks the image tower. Freeze before ``build_optimizer`` and ``wrap_model``: both look at
    ``requires_grad`` when they are built.
    """
    try:
        module = model.get_submodule(tower) if tower else None
    except AttributeError:
        module = None
    if module is None or module is model:
        raise ConfigError(f"tower must name a submodule of the model, got {tower!r}")
    module.requires_grad_(False)
    module.train = types.MethodType(_stay_in_eval, module)  # a bound method: deepcopy rebinds it to the copy
    module.eval()
    return module
