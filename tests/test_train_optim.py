"""LAMB against a by-hand computation, parameter groups, schedules, EMA and tower freezing."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from openalign.errors import ConfigError
from openalign.train.ema import ModelEma
from openalign.train.loop import Stepper
from openalign.train.optim import Lamb, build_optimizer, freeze_tower, param_groups
from openalign.train.schedule import build_scheduler, lr_lambda, set_total_steps
from tests.dist_worker import make_batch, make_model


def lamb_by_hand(weight, grads, lr, beta1, beta2, eps, weight_decay, adapt, max_ratio=None):
    """Plain tensor ops, one line per formula of the module docstring."""
    m, v = torch.zeros_like(weight), torch.zeros_like(weight)
    for step, grad in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
        update = m_hat / (v_hat.sqrt() + eps) + weight_decay * weight
        ratio = 1.0
        if adapt and weight.norm() > 0 and update.norm() > 0:
            ratio = float(weight.norm() / update.norm())
            ratio = min(ratio, max_ratio) if max_ratio is not None else ratio
        weight = weight - lr * ratio * update
    return weight


@pytest.mark.parametrize("max_trust_ratio", [None, 0.5])
def test_lamb_two_steps_match_by_hand(max_trust_ratio):
    generator = torch.Generator().manual_seed(0)
    weight0 = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    bias0 = torch.randn(3, generator=generator, dtype=torch.float64)
    grads_w = [torch.randn(4, 3, generator=generator, dtype=torch.float64) for _ in range(2)]
    grads_b = [torch.randn(3, generator=generator, dtype=torch.float64) for _ in range(2)]
    weight, bias = nn.Parameter(weight0.clone()), nn.Parameter(bias0.clone())
    settings = dict(lr=0.1, betas=(0.8, 0.9), eps=1e-6, max_trust_ratio=max_trust_ratio)
    optimizer = Lamb([{"params": [weight], "weight_decay": 0.3}, {"params": [bias], "weight_decay": 0.0}], **settings)
    for grad_w, grad_b in zip(grads_w, grads_b):
        weight.grad, bias.grad = grad_w, grad_b
        optimizer.step()
    expected_w = lamb_by_hand(weight0, grads_w, 0.1, 0.8, 0.9, 1e-6, 0.3, adapt=True, max_ratio=max_trust_ratio)
    expected_b = lamb_by_hand(bias0, grads_b, 0.1, 0.8, 0.9, 1e-6, 0.0, adapt=False)
    torch.testing.assert_close(weight.detach(), expected_w, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bias.detach(), expected_b, rtol=1e-12, atol=1e-14)
    # The trust ratio changed the weight's step: plain Adam (no adaptation) lands elsewhere.
    adam_like = lamb_by_hand(weight0, grads_w, 0.1, 0.8, 0.9, 1e-6, 0.3, adapt=False)
    assert (weight.detach() - adam_like).abs().max() > 1e-3


def test_adamw_fused_takes_gradients_of_any_layout_and_matches_the_for_loop():
    """The fused kernel (used where every parameter is a plain CPU or CUDA tensor) against torch's for-loop
    AdamW, on a channels-last weight whose gradient comes contiguous (the CPU kernel would mix up elements)."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(6, 4, 3, 3, generator=generator).contiguous(memory_format=torch.channels_last)
    grads = [torch.randn(6, 4, 3, 3, generator=generator) for _ in range(3)]
    weights = []
    for make in (lambda ps: build_optimizer("adamw", ps, lr=0.01, weight_decay=0.1),
                 lambda ps: torch.optim.AdamW(param_groups(ps, 0.1), lr=0.01, eps=1e-6, foreach=False)):
        holder = nn.Conv2d(4, 6, 3, bias=False)
        holder.weight = nn.Parameter(start.clone())
        optimizer = make(holder)
        for grad in grads:
            holder.weight.grad = grad.clone()
            optimizer.step()
        weights.append(holder.weight.detach())
    assert build_optimizer("adamw", nn.Linear(2, 2), lr=0.01).defaults["fused"]
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-6, atol=1e-7)
    assert (weights[0] - start).abs().mean() > 0.01  # it moved


def test_lamb_zero_weight_takes_the_adam_step():
    weight = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    grad = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    weight.grad = grad
    Lamb([weight], lr=0.1, weight_decay=0.1, layer_adaptation=True).step()
    expected = lamb_by_hand(torch.zeros(2, 2, dtype=torch.float64), [grad], 0.1, 0.9, 0.999, 1e-6, 0.1, True)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-12, atol=0)
    assert weight.detach().abs().min() > 0.09  # the full Adam step of lr, not a zero trust ratio


def test_param_groups_skip_biases_norms_and_temperature():
    model = make_model()
    decay, no_decay = param_groups(model, weight_decay=1e-5)
    assert decay["weight_decay"] == 1e-5 and no_decay["weight_decay"] == 0.0
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    expected_decay = {model.image_tower[0].weight, model.image_tower[4].weight, model.text_tower.weight,
                      model.text_projection.weight}  # fmt: skip
    assert ids(decay["params"]) == ids(expected_decay)
    assert id(model.temperature) in ids(no_decay["params"])
    assert id(model.image_tower[1].weight) in ids(no_decay["params"])  # BatchNorm scale
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_build_optimizer_names_and_errors():
    model = make_model()
    lamb = build_optimizer("lamb", model, lr=1e-3, weight_decay=1e-5)
    assert isinstance(lamb, Lamb) and [g["layer_adaptation"] for g in lamb.param_groups] == [True, False]
    adamw = build_optimizer("adamw", model, lr=1e-3, weight_decay=0.05)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[1]["weight_decay"] == 0.0
    with pytest.raises(ConfigError, match="'sgd'"):
        build_optimizer("sgd", model, lr=1e-3)


class _Pair(nn.Module):
    """Features that are two parameters, so that the loss below gives them gradients of 3 and 4 everywhere."""

    def __init__(self):
        super().__init__()
        self.image, self.text = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))

    def forward(self, pixel_values, input_ids, attention_mask, token_type_ids):
        return self.image[None], self.text[None]


def _clipped_step(grad_clip: float | None) -> tuple[float, torch.Tensor]:
    """One Stepper step with SGD at lr 1: (the gradient norm it reports, the gradient it applied)."""
    pair = _Pair()
    optimizer = torch.optim.SGD(pair.parameters(), lr=1.0)
    stepper = Stepper(
        features=pair, loss_fn=lambda image, text: 3 * image.sum() + 4 * text.sum(), optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        scaler=torch.amp.GradScaler("cpu", enabled=False), parameters=list(pair.parameters()), grad_clip=grad_clip,
    )
    batch = {key: torch.zeros(1) for key in ("pixel_values", "input_ids", "attention_mask", "token_type_ids")}
    result = stepper.step(batch, 1)
    return result.grad_norm, -torch.cat([pair.image.detach(), pair.text.detach()])  # SGD at lr 1: w = -grad


def test_the_step_clips_the_global_gradient_norm():
    norm, applied = _clipped_step(grad_clip=1.0)
    assert norm == pytest.approx(math.sqrt(9 * 3 + 16 * 4))  # the norm before clipping
    assert float(applied.norm()) == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(applied, torch.cat([torch.full((3,), 3.0), torch.full((4,), 4.0)]) / norm)
    _, unclipped = _clipped_step(grad_clip=None)  # None: no clipping
    assert float(unclipped.norm()) == pytest.approx(math.sqrt(9 * 3 + 16 * 4))


def test_schedule_values():
    assert lr_lambda(0, 10, 110) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 110) == pytest.approx(1.0)
    assert lr_lambda(60, 10, 110, "linear") == pytest.approx(0.5)
    assert lr_lambda(60, 10, 110, "cosine") == pytest.approx(0.5)
    assert lr_lambda(35, 10, 110, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_lambda(110, 10, 110, "linear", final_ratio=0.1) == pytest.approx(0.1)
    assert lr_lambda(500, 10, 110, "cosine", final_ratio=0.1) == pytest.approx(0.1)
    assert lr_lambda(500, 10, 110, "constant") == 1.0
    with pytest.raises(ConfigError, match="'step'"):
        build_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 1, 2, kind="step")
    with pytest.raises(ConfigError, match="5 and 3"):
        build_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 5, 3)


def test_scheduler_resumes_from_its_state_dict():
    def make():
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
        return optimizer, build_scheduler(optimizer, warmup_steps=3, total_steps=10, kind="cosine")

    optimizer, scheduler = make()
    uninterrupted = []
    for _ in range(8):
        uninterrupted.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    optimizer, scheduler = make()
    resumed = []
    for _ in range(4):
        resumed.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # A checkpoint holds both: the optimiser's groups carry the current lr, the scheduler its step count.
    states = copy.deepcopy((optimizer.state_dict(), scheduler.state_dict()))
    optimizer, scheduler = make()
    optimizer.load_state_dict(states[0])
    scheduler.load_state_dict(states[1])
    for _ in range(4):
        resumed.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert resumed == pytest.approx(uninterrupted) and uninterrupted[0] == pytest.approx(2.0 / 3)


def test_ema_update_swap_and_state_dict():
    model = make_model()
    ema = ModelEma(model, decay=0.9)
    start = model.text_projection.weight.detach().clone()
    targets = []
    for shift in (1.0, 2.0):
        with torch.no_grad():
            model.text_projection.weight.add_(shift)
            model.image_tower[1].running_mean.add_(shift)
        targets.append(model.text_projection.weight.detach().clone())
        ema.update(model)
    expected = 0.9 * (0.9 * start + 0.1 * targets[0]) + 0.1 * targets[1]
    torch.testing.assert_close(ema.module.text_projection.weight, expected, rtol=1e-12, atol=1e-12)
    own = model.text_projection.weight.detach().clone()
    with ema.swapped_into(model):
        torch.testing.assert_close(model.text_projection.weight.detach(), expected)
    torch.testing.assert_close(model.text_projection.weight.detach(), own, rtol=0, atol=0)
    restored = ModelEma(make_model(seed=5), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9 and restored.num_updates == 2
    torch.testing.assert_close(restored.module.text_projection.weight, expected)


def test_freeze_tower_stops_gradients_and_keeps_batchnorm_in_eval():
    model = make_model()
    frozen = freeze_tower(model, "image_tower")
    model.train()
    assert not frozen.training and not frozen[1].training and model.text_tower.training
    before = frozen[1].running_mean.clone()
    images, tokens = make_batch(4)
    image_features, text_features = model(images, tokens)
    (image_features.sum() + text_features.sum()).backward()
    assert all(p.grad is None for p in frozen.parameters())
    assert model.text_projection.weight.grad is not None
    torch.testing.assert_close(frozen[1].running_mean, before, rtol=0, atol=0)
    decay, no_decay = param_groups(model, 0.1)
    assert not {id(p) for p in frozen.parameters()} & {id(p) for p in decay["params"] + no_decay["params"]}
    # A deep copy (as the EMA makes) stays frozen in eval mode too.
    copied = copy.deepcopy(model)
    copied.train()
    assert not copied.image_tower.training and copied.text_tower.training
    with pytest.raises(ConfigError, match="'vision'"):
        freeze_tower(model, "vision")


def test_set_total_steps_redirects_the_decay_from_the_next_step():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=10, kind="cosine")
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    set_total_steps(scheduler, 20)
    assert rates == pytest.approx([2.0 * lr_lambda(step, 2, 10) for step in range(4)])  # taken steps unchanged
    # Step 4's rate was set when step 3 ended, under the old total; from step 5 on the new total decides.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * lr_lambda(4, 2, 10))
    for step in range(5, 9):
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * lr_lambda(step, 2, 20))
    with pytest.raises(ConfigError, match="warmup_steps = 2"):
        set_total_steps(scheduler, 1)
    with pytest.raises(TypeError, match="build_scheduler"):
        set_total_steps(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), 5)
