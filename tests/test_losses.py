"""Single-process losses against formulas written out by hand (and transformers' align_loss)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from openalign.errors import ConfigError
from openalign.losses import LOSSES, AlignLoss, ClipLoss, SigLipLoss, align_loss, build_loss
from openalign.train.config import LossSection, TrainConfig


def embeddings(batch_size: int = 6, dim: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch_size, dim, generator=generator, dtype=torch.float64) * 3
    text = torch.randn(batch_size, dim, generator=generator, dtype=torch.float64) * 3
    return image, text


def smoothed_cross_entropy(logits: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Targets on the diagonal: -(1 - e) log p_ii - e / N sum_j log p_ij, averaged over rows."""
    log_probs = logits.log_softmax(dim=-1)
    num_classes = logits.shape[1]
    per_row = -(1 - smoothing) * log_probs.diagonal() - smoothing / num_classes * log_probs.sum(dim=-1)
    return per_row.mean()


def test_align_loss_matches_the_formula_and_transformers():
    transformers_align_loss = pytest.importorskip("transformers.models.align.modeling_align").align_loss

    image, text = embeddings()
    temperature = torch.tensor(0.3, dtype=torch.float64)
    image_unit = image / image.norm(dim=-1, keepdim=True)
    text_unit = text / text.norm(dim=-1, keepdim=True)
    logits_per_text = text_unit @ image_unit.T / temperature
    by_hand = (smoothed_cross_entropy(logits_per_text, 0.1) + smoothed_cross_entropy(logits_per_text.T, 0.1)) / 2
    loss = AlignLoss()(image, text, temperature)
    torch.testing.assert_close(loss, by_hand, rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, transformers_align_loss(logits_per_text), rtol=1e-12, atol=0)
    # The model's own return_loss (the logits' function) is transformers' to the bit.
    assert torch.equal(align_loss(logits_per_text), transformers_align_loss(logits_per_text))


def test_align_loss_owns_or_takes_the_temperature_and_differentiates_it():
    image, text = embeddings()
    owned = AlignLoss(temperature_init=1.0).double()
    assert owned.temperature.shape == () and owned.temperature.item() == 1.0
    owned(image, text).backward()
    assert owned.temperature.grad is not None and owned.temperature.grad.abs() > 0
    taken = torch.tensor(1.0, dtype=torch.float64)
    torch.testing.assert_close(owned(image, text), AlignLoss()(image, text, taken), rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="temperature"):
        AlignLoss()(image, text)


def test_align_loss_normalises_and_is_invariant_to_embedding_scale():
    image, text = embeddings()
    temperature = torch.tensor(0.5, dtype=torch.float64)
    loss = AlignLoss()
    torch.testing.assert_close(loss(image * 7, text * 0.1, temperature), loss(image, text, temperature))
    # Without normalisation the scale matters, so the flag does something.
    raw = AlignLoss(normalize=False)
    assert not torch.allclose(raw(image * 7, text, temperature), raw(image, text, temperature))


def test_clip_loss_uses_exp_scale_capped_at_max():
    image, text = embeddings()
    loss = ClipLoss()
    scale = torch.tensor(math.log(20.0), dtype=torch.float64)
    expected = AlignLoss(label_smoothing=0.0)(image, text, torch.tensor(1 / 20.0, dtype=torch.float64))
    torch.testing.assert_close(loss(image, text, scale), expected, rtol=1e-12, atol=0)
    at_cap = loss(image, text, torch.tensor(math.log(100.0), dtype=torch.float64))
    above_cap = loss(image, text, torch.tensor(math.log(1000.0), dtype=torch.float64))
    torch.testing.assert_close(above_cap, at_cap, rtol=1e-14, atol=0)
    owned = ClipLoss(logit_scale_init=math.log(1000.0))
    owned.clamp_()
    assert owned.logit_scale.item() == pytest.approx(math.log(100.0))


def test_siglip_loss_matches_a_loop_over_pairs():
    image, text = embeddings()
    loss = SigLipLoss().double()
    assert loss.logit_scale.item() == pytest.approx(math.log(10.0)) and loss.logit_bias.item() == -10.0
    scale, bias = torch.tensor(1.7, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    image_unit = image / image.norm(dim=-1, keepdim=True)
    text_unit = text / text.norm(dim=-1, keepdim=True)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(len(image)):
        for j in range(len(text)):
            sign = 1.0 if i == j else -1.0
            logit = math.exp(1.7) * image_unit[i] @ text_unit[j] - 2.0
            total = total + torch.log1p(torch.exp(-sign * logit))  # -log sigmoid(sign * logit)
    torch.testing.assert_close(loss(image, text, scale, bias), total / len(image), rtol=1e-12, atol=0)
    loss(image, text).backward()
    assert loss.logit_scale.grad.abs() > 0 and loss.logit_bias.grad.abs() > 0


def test_loss_gradient_reaches_embeddings_and_temperature():
    image, text = embeddings()
    image.requires_grad_(True)
    temperature = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    AlignLoss()(image, text, temperature).backward()
    assert image.grad.norm() > 0 and temperature.grad.abs() > 0


def test_build_loss_selects_by_name_and_rejects_unknown():
    assert isinstance(build_loss(), AlignLoss)
    assert isinstance(build_loss("clip"), ClipLoss)
    assert isinstance(build_loss("siglip"), SigLipLoss)
    with pytest.raises(ConfigError, match="'sigmoid'"):
        build_loss("sigmoid")
    with pytest.raises(ConfigError, match="1.5"):
        AlignLoss(label_smoothing=1.5)


def hard_negative_loss_by_hand(image: torch.Tensor, text: torch.Tensor, temperature: float, beta: float):
    """Both directions written out row by row: negative j of row i counts (N - 1) exp(beta c_ij) / sum_k≠i
    exp(beta c_ik) times in the denominator (weights without gradient), the positive once."""
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)

    def direction(cosines: torch.Tensor) -> torch.Tensor:
        total = 0.0
        n = cosines.shape[0]
        for i in range(n):
            negatives = [j for j in range(n) if j != i]
            weights = torch.stack([torch.exp(beta * cosines[i, j].detach()) for j in negatives])
            weights = weights * (n - 1) / weights.sum()
            denominator = torch.exp(cosines[i, i] / temperature) + sum(
                weight * torch.exp(cosines[i, j] / temperature) for weight, j in zip(weights, negatives))
            total = total - (cosines[i, i] / temperature - torch.log(denominator))
        return total / n

    cosines = image @ text.T
    return (direction(cosines) + direction(cosines.T)) / 2


@pytest.mark.parametrize("loss_class", [AlignLoss, ClipLoss])
def test_hard_negative_weighting_matches_the_formula_and_its_gradient(loss_class):
    image, text = embeddings(batch_size=7)
    image.requires_grad_(True)
    temperature, beta = 0.3, 4.0
    if loss_class is AlignLoss:
        scalar = torch.tensor(temperature, dtype=torch.float64)
    else:
        scalar = torch.tensor(-math.log(temperature), dtype=torch.float64)
    got = loss_class(label_smoothing=0.0, hard_negative_beta=beta)(image, text, scalar)
    expected = hard_negative_loss_by_hand(image, text, temperature, beta)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, image)[0], torch.autograd.grad(expected, image)[0])


def test_hard_negative_weighting_off_is_the_plain_loss_and_on_stresses_close_negatives():
    image, text = embeddings()
    temperature = torch.tensor(0.5, dtype=torch.float64)
    plain = AlignLoss()(image, text, temperature)
    torch.testing.assert_close(AlignLoss(hard_negative_beta=0.0)(image, text, temperature), plain)
    # The weights average 1, so they only move the loss where negatives differ in similarity: with every
    # negative equally similar (orthogonal embeddings) the weighted loss is the plain one.
    basis = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(AlignLoss(hard_negative_beta=3.0)(basis, basis, temperature),
                               AlignLoss()(basis, basis, temperature))
    # Otherwise the close negatives weigh more and the loss rises (weights rising with e^x raise its mean).
    assert AlignLoss(hard_negative_beta=3.0)(image, text, temperature) > plain
    with pytest.raises(ConfigError, match="hard_negative_beta"):
        AlignLoss(hard_negative_beta=-0.5)


class _Model(nn.Module):
    """What a loss needs of a model: its temperature."""

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(temperature, dtype=torch.float64))


def _from_config(name: str, temperature: float = 0.2, **settings):
    model = _Model(temperature)
    loss = LOSSES[name].from_config(LossSection(name=name, **settings), temperature).double()
    loss.attach(model)
    return model, loss


def test_align_from_a_config_trains_the_model_temperature():
    image, text = embeddings()
    model, loss = _from_config("align", label_smoothing=0.05)
    assert loss.uses_model_temperature and model.temperature.requires_grad
    assert loss.trained_scalars(model) == [model.temperature] and loss.own_parameters() == []
    expected = AlignLoss(label_smoothing=0.05)(image, text, torch.tensor(0.2, dtype=torch.float64))
    torch.testing.assert_close(loss.bind(model)(image, text), expected, rtol=1e-14, atol=0)
    with torch.no_grad():
        model.temperature.fill_(0.3)  # the model's value at each call, not the one it was built with
    assert loss.temperature_in_use(model) == pytest.approx(0.3)
    torch.testing.assert_close(loss.bind(model)(image, text),
                               AlignLoss(label_smoothing=0.05)(image, text, torch.tensor(0.3, dtype=torch.float64)))


def test_clip_from_a_config_owns_its_scale_from_the_model_temperature_and_clamps_it():
    image, text = embeddings()
    model, loss = _from_config("clip", label_smoothing=0.05)
    assert not loss.uses_model_temperature and not model.temperature.requires_grad  # the model's stays put
    assert loss.trained_scalars(model) == loss.own_parameters() == [loss.logit_scale]
    # Scale 1 / 0.2 (held as a float32 log): the softmax of ALIGN's loss at temperature 0.2.
    expected = AlignLoss(label_smoothing=0.05)(image, text, torch.tensor(0.2, dtype=torch.float64))
    torch.testing.assert_close(loss.bind(model)(image, text), expected, rtol=1e-6, atol=0)
    assert loss.temperature_in_use(model) == pytest.approx(0.2)
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(1000.0))
    loss.after_step()
    assert loss.logit_scale.item() == pytest.approx(math.log(100.0))


def test_siglip_from_a_config_owns_scale_and_bias():
    image, text = embeddings()
    model, loss = _from_config("siglip")
    assert not loss.uses_model_temperature and not model.temperature.requires_grad
    assert loss.own_parameters() == [loss.logit_scale, loss.logit_bias]
    assert loss.temperature_in_use(model) == pytest.approx(0.1)  # SigLIP's starting scale, 10
    expected = SigLipLoss().double()(image, text)
    torch.testing.assert_close(loss.bind(model)(image, text), expected, rtol=1e-14, atol=0)


def test_config_choices_and_checks_come_from_the_registry(monkeypatch):
    config = TrainConfig()
    config.set("loss.name", "sigmoid")
    with pytest.raises(ConfigError, match=r"loss\.name = 'sigmoid' is invalid; choose one of \['align', 'clip', "
                       r"'siglip', 'rcl', 'rince'\]"):
        config.validate()

    class Toy(SigLipLoss):
        name = "toy"
        hard_negatives = True

    monkeypatch.setitem(LOSSES, "toy", Toy)
    config.set("loss.name", "toy")
    config.set("loss.hard_negative_beta", 2.0)
    assert config.validate() is config  # a registered loss that declares hard negatives takes beta
    config.set("loss.name", "siglip")
    with pytest.raises(ConfigError, match="loss.hard_negative_beta"):
        config.validate()
