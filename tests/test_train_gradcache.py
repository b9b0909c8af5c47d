"""GradCache accumulation against one step on the whole batch (float64, single process)."""

from __future__ import annotations

import pytest
import torch

from openalign.losses import AlignLoss, SigLipLoss
from openalign.train.gradcache import accumulated_step, split_batch
from tests.dist_worker import gradients, make_batch, make_model

TOLERANCE = 1e-6  # relative, per gradient tensor


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    # An absolute floor for gradients that are zero up to rounding (a bias feeding a training-mode BatchNorm).
    return float((actual - expected).norm() / max(float(expected.norm()), 1e-9))


def assert_same_gradients(actual: dict, expected: dict, cancelled: tuple[str, ...] = ()) -> None:
    """Every gradient equal to the oracle's; all nonzero except ``cancelled`` ones, zero in exact arithmetic."""
    assert actual.keys() == expected.keys() and len(expected) >= 7, sorted(actual)
    for name, grad in expected.items():
        assert name in cancelled or grad.norm() > 1e-6, name
        error = relative_error(actual[name], grad)
        assert error < TOLERANCE, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("num_micro_batches", [2, 4])
def test_accumulated_gradients_equal_full_batch_gradients(num_micro_batches):
    images, tokens = make_batch(8)
    loss = AlignLoss()

    full = make_model().eval()  # eval-mode BatchNorm: the same function on any batch split
    full_loss = loss(*full(images, tokens), full.temperature)
    full_loss.backward()

    model = make_model().eval()
    accumulated_loss = accumulated_step(
        lambda batch: model(*batch),
        lambda image, text: loss(image, text, model.temperature),
        split_batch((images, tokens), num_micro_batches),
        loss_parameters=[model.temperature],
        model=model,
    )
    assert relative_error(accumulated_loss, full_loss.detach()) < TOLERANCE
    assert_same_gradients(gradients(model), gradients(full))


def test_loss_owned_scalars_get_full_batch_gradients():
    images, tokens = make_batch(8)
    full, full_loss = make_model().eval(), SigLipLoss().double()
    full_loss(*full(images, tokens)).backward()

    model, loss = make_model().eval(), SigLipLoss().double()
    accumulated_step(lambda batch: model(*batch), loss, split_batch((images, tokens), 4), list(loss.parameters()))
    expected = gradients(full) | gradients(full_loss, "loss.")
    assert_same_gradients(gradients(model) | gradients(loss, "loss."), expected)


def test_dropout_and_train_batchnorm_replay_per_micro_batch_semantics():
    # Oracle: encode the micro-batches one after another with gradient, from the same RNG state, then one loss.
    images, tokens = make_batch(8)
    micro_batches = split_batch((images, tokens), 2)
    loss = AlignLoss()

    oracle = make_model(dropout=0.5).train()
    torch.manual_seed(123)
    parts = [oracle(*batch) for batch in micro_batches]
    loss(*(torch.cat(p) for p in zip(*parts)), oracle.temperature).backward()
    rng_after_oracle = torch.rand(3)

    model = make_model(dropout=0.5).train()
    torch.manual_seed(123)
    accumulated_step(
        lambda batch: model(*batch),
        lambda image, text: loss(image, text, model.temperature),
        micro_batches,
        [model.temperature],
        model=model,
    )
    # The global RNG continues from where pass 1 left it, as after the oracle's single pass.
    torch.testing.assert_close(torch.rand(3), rng_after_oracle, rtol=0, atol=0)
    assert_same_gradients(gradients(model), gradients(oracle), cancelled=("image_tower.0.bias",))
    # Running statistics moved once per micro-batch, not twice.
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        expected = getattr(oracle.image_tower[1], name)
        torch.testing.assert_close(getattr(model.image_tower[1], name), expected, rtol=1e-12, atol=0)

    # Other dropout masks give other gradients: the replay is what makes the comparison pass.
    other = make_model(dropout=0.5).train()
    torch.manual_seed(124)
    parts = [other(*batch) for batch in micro_batches]
    loss(*(torch.cat(p) for p in zip(*parts)), other.temperature).backward()
    grad = gradients(other)["image_tower.0.weight"]
    assert relative_error(grad, gradients(oracle)["image_tower.0.weight"]) > 1e-3


def test_frozen_tower_composes_with_accumulation():
    from openalign.train.optim import freeze_tower

    images, tokens = make_batch(8)
    loss = AlignLoss()
    full = make_model()
    freeze_tower(full, "image_tower")
    loss(*full(images, tokens), full.temperature).backward()

    model = make_model()
    freeze_tower(model, "image_tower")
    accumulated_step(
        lambda batch: model(*batch),
        lambda image, text: loss(image, text, model.temperature),
        split_batch((images, tokens), 4),
        [model.temperature],
        model=model,
    )
    actual, expected = gradients(model), gradients(full)
    assert actual.keys() == expected.keys() == {"text_tower.weight", "text_projection.weight",
                                                "text_projection.bias", "temperature"}  # fmt: skip
    for name, grad in expected.items():
        assert relative_error(actual[name], grad) < TOLERANCE, name


def test_split_batch_and_empty_input_errors():
    images, tokens = make_batch(6)
    parts = split_batch((images, tokens), 3)
    assert len(parts) == 3 and parts[1][0].shape == (2, images.shape[1])
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), tokens)
    with pytest.raises(ValueError, match="batch size 6 does not split into 4"):
        split_batch((images, tokens), 4)
    with pytest.raises(ValueError, match="empty"):
        accumulated_step(lambda batch: batch, lambda *features: features[0].sum(), [])
