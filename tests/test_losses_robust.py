"""The noise-robust losses (complementary contrastive, robust InfoNCE) and per-pair weights against brute-force
float64 formulas written pair by pair, value and gradient; their settings and refusals."""

from __future__ import annotations

import math

import pytest
import torch

from openalign.errors import ConfigError
from openalign.losses import AlignLoss, ClipLoss, ComplementaryContrastiveLoss, RobustInfoNCELoss
from openalign.train.config import TrainConfig
from tests.test_losses import embeddings


def cosines_of(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return image @ text.T  # (B, B): image i against text j


def by_pairs(row_loss, image, text, temperature, weights=None):
    """Mean over pairs i (weighted) of (row i of images->texts + row i of texts->images) / 2, row by row."""
    cosines = cosines_of(image, text)
    n = cosines.shape[0]
    weights = torch.ones(n, dtype=torch.float64) if weights is None else weights
    total = 0.0
    for i in range(n):
        image_row = [cosines[i, j] / temperature for j in range(n)]
        text_row = [cosines[j, i] / temperature for j in range(n)]
        total = total + weights[i] * (row_loss(image_row, i) + row_loss(text_row, i)) / 2
    return total / weights.sum()


def complementary_row(logits: list, i: int):
    """-sum_{j != i} log(1 - p_ij), p the softmax of the row."""
    denominator = sum(torch.exp(z) for z in logits)
    return -sum(torch.log(1 - torch.exp(logits[j]) / denominator) for j in range(len(logits)) if j != i)


def rince_row(q: float, lam: float):
    def row(logits: list, i: int):
        return -torch.exp(logits[i]) ** q / q + (lam * sum(torch.exp(z) for z in logits)) ** q / q

    return row


def cross_entropy_row(logits: list, i: int):
    return -(logits[i] - torch.log(sum(torch.exp(z) for z in logits)))


CASES = [
    (ComplementaryContrastiveLoss(), complementary_row),
    (RobustInfoNCELoss(q=0.5, lam=0.01), rince_row(0.5, 0.01)),
    (RobustInfoNCELoss(q=1.0, lam=0.1), rince_row(1.0, 0.1)),
]


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "pair-weights"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=["rcl", "rince-q0.5", "rince-q1"])
def test_robust_losses_match_the_formula_and_its_gradient(case, weighted):
    loss, row = CASES[case]
    image, text = embeddings(batch_size=7)
    image.requires_grad_(True)
    text.requires_grad_(True)
    temperature = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([1.0, 0.2, 0.0, 0.7, 1.0, 0.05, 0.9], dtype=torch.float64) if weighted else None
    got = loss(image, text, temperature, pair_weights=weights)
    expected = by_pairs(row, image, text, temperature, weights)
    torch.testing.assert_close(got, expected)
    for mine, theirs in zip(torch.autograd.grad(got, (image, text, temperature)),
                            torch.autograd.grad(expected, (image, text, temperature))):
        torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize("loss_class", [AlignLoss, ClipLoss])
def test_pair_weights_weigh_each_pairs_loss_and_ones_are_the_plain_loss(loss_class):
    image, text = embeddings(batch_size=6)
    image.requires_grad_(True)
    scalar = torch.tensor(0.5 if loss_class is AlignLoss else -math.log(0.5), dtype=torch.float64)
    loss = loss_class(label_smoothing=0.0)
    torch.testing.assert_close(loss(image, text, scalar, pair_weights=torch.ones(6, dtype=torch.float64)),
                               loss(image, text, scalar))
    weights = torch.tensor([0.0, 1.0, 0.5, 0.0, 2.0, 1.0], dtype=torch.float64)
    got = loss(image, text, scalar, pair_weights=weights)
    expected = by_pairs(cross_entropy_row, image, text, 0.5, weights)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, image)[0], torch.autograd.grad(expected, image)[0])


def test_every_softmax_loss_leaves_each_pairs_match_probability():
    image, text = embeddings(batch_size=5)
    temperature = torch.tensor(0.3, dtype=torch.float64)
    for loss in (AlignLoss(), ComplementaryContrastiveLoss(), RobustInfoNCELoss()):
        loss(image, text, temperature)
        logits = cosines_of(image, text) / temperature
        expected = (logits.softmax(dim=1).diagonal() + logits.T.softmax(dim=1).diagonal()) / 2
        torch.testing.assert_close(loss.last_match_probability, expected)
        assert not loss.last_match_probability.requires_grad


def test_a_wrong_positive_pulls_the_complementary_loss_less_than_cross_entropy():
    # Pair 0's caption is another image's (a mismatched caption): its text sits on image 1. Cross-entropy
    # pulls image 0 towards it without bound; the complementary loss barely (its positive is never pulled).
    image = torch.eye(4, dtype=torch.float64)
    text = torch.eye(4, dtype=torch.float64)[[1, 1, 2, 3]] + 0.01
    image.requires_grad_(True)
    temperature = torch.tensor(0.1, dtype=torch.float64)
    pull = {}
    for name, loss in (("ce", AlignLoss(label_smoothing=0.0)), ("rcl", ComplementaryContrastiveLoss())):
        gradient = torch.autograd.grad(loss(image, text, temperature), image)[0]
        pull[name] = float(gradient[0].norm())
    assert pull["rcl"] < 0.5 * pull["ce"], pull


def test_robust_settings_come_from_the_config_and_bad_ones_are_refused():
    config = TrainConfig()
    config.set("loss.name", "rince")
    config.set("loss.robust_q", 0.25)
    config.set("loss.fixed_temperature", True)
    config.validate()
    from openalign.train.builders import build_contrastive_loss
    from tests.test_losses import _Model

    model = _Model(0.07)
    loss = build_contrastive_loss(config.loss, model)
    assert isinstance(loss, RobustInfoNCELoss) and loss.q == 0.25 and loss.lam == 0.01
    assert not model.temperature.requires_grad  # fixed_temperature keeps it where it starts
    for key, value, message in (("loss.robust_q", 0.0, "robust_q"), ("loss.robust_q", 1.5, "robust_q"),
                                ("loss.robust_lambda", 0.0, "robust_lambda")):
        bad = TrainConfig()
        bad.set("loss.name", "rince")
        bad.set(key, value)
        with pytest.raises(ConfigError, match=message):
            bad.validate()
    with pytest.raises(ConfigError, match="hard_negative_beta"):
        bad = TrainConfig()
        bad.set("loss.name", "rcl")
        bad.set("loss.hard_negative_beta", 1.0)
        bad.validate()
