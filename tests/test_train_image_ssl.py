"""The label-free image term: its second views scramble colour and nothing else they are not asked to, its loss
is InfoNCE computed by brute force, and a training step with it is the step of the summed loss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from openalign.errors import ConfigError
from openalign.train.config import TrainConfig
from openalign.train.image_ssl import ImageSelfSupervision, second_view

STILL = {"brightness": 0.0, "contrast": 0.0, "scale": (1.0, 1.0), "shift": 0.0}  # colour changes only


def flat_colour_images(batch: int, size: int = 8) -> torch.Tensor:
    """(B, 3, size, size): image i is one colour with three distinct channel values."""
    colours = torch.stack([torch.tensor([-0.8, 0.1, 0.7]).roll(i) + 0.01 * i for i in range(batch)])
    return colours[:, :, None, None].expand(-1, -1, size, size).clone()


def test_second_view_permutes_channels_per_image_and_keeps_the_shape():
    pixels = flat_colour_images(64)
    views = second_view(pixels, grey_rate=0.0, generator=torch.Generator().manual_seed(0), **STILL)
    assert views.shape == pixels.shape
    orders = set()
    for image, view in zip(pixels, views):
        source, seen = image[:, 0, 0], view[:, 0, 0]
        matching = [order for order in itertools.permutations(range(3))
                    if torch.allclose(seen, source[list(order)], atol=1e-6)]
        assert len(matching) == 1, (source, seen)
        orders.add(matching[0])
    assert len(orders) == 6  # every order is drawn, the identity among them


def test_second_view_grey_images_have_equal_channels_and_the_draws_follow_the_generator():
    pixels = flat_colour_images(16)
    grey = second_view(pixels, grey_rate=1.0, **STILL)
    assert torch.allclose(grey, pixels.mean(1, keepdim=True).expand_as(pixels), atol=1e-6)
    first, again, other = (second_view(pixels, generator=torch.Generator().manual_seed(seed)) for seed in (3, 3, 4))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_second_view_without_jitter_is_the_image_or_its_mirror():
    pixels = torch.randn(32, 3, 10, 10)
    views = second_view(pixels, generator=torch.Generator().manual_seed(1), grey_rate=0.0, **STILL)
    mirrored = 0
    for image, view in zip(pixels, views):
        # Undo the channel order (found from the mean of each channel), then compare the geometry.
        order = [int((view[c].mean() - image.mean((1, 2))).abs().argmin()) for c in range(3)]
        same = torch.allclose(view, image[order], atol=1e-5)
        mirror = torch.allclose(view, image[order].flip(-1), atol=1e-5)
        assert same or mirror
        mirrored += mirror
    assert 0 < mirrored < len(pixels)


def test_loss_is_weighted_symmetric_infonce_by_brute_force():
    torch.manual_seed(0)
    term = ImageSelfSupervision(embed_dim=12, weight=0.7, temperature=0.2, hidden_dim=16, out_dim=5).eval()
    first, second = torch.randn(6, 12), torch.randn(6, 12)
    loss = term(first, second)

    with torch.no_grad():
        a = [v / v.norm() for v in term.head(first).double()]
        b = [v / v.norm() for v in term.head(second).double()]
    n = len(a)
    rows = [-math.log(math.exp(float(a[i] @ b[i]) / 0.2) / sum(math.exp(float(a[i] @ b[j]) / 0.2) for j in range(n)))
            for i in range(n)]
    columns = [-math.log(math.exp(float(a[j] @ b[j]) / 0.2) / sum(math.exp(float(a[i] @ b[j]) / 0.2)
                                                                  for i in range(n))) for j in range(n)]
    expected = 0.7 * (sum(rows) / n + sum(columns) / n) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_the_weight_rises_linearly_over_the_warmup_and_scales_the_loss():
    term = ImageSelfSupervision(embed_dim=6, weight=0.8, warmup_steps=4, hidden_dim=8, out_dim=3).eval()
    assert [term.weight_at(step) for step in (1, 2, 4, 10, None)] == pytest.approx([0.2, 0.4, 0.8, 0.8, 0.8])
    assert ImageSelfSupervision(embed_dim=6, weight=0.8).weight_at(1) == 0.8  # no warmup: full weight at once
    first, second = torch.randn(5, 6), torch.randn(5, 6)
    assert term(first, second, 1).item() == pytest.approx(term(first, second).item() / 4, rel=1e-6)


def test_second_views_take_the_first_images_of_the_batch():
    term = ImageSelfSupervision(embed_dim=4, images=3)
    assert term.second_views(torch.randn(8, 3, 6, 6)).shape == (3, 3, 6, 6)
    assert ImageSelfSupervision(embed_dim=4, images=0).second_views(torch.randn(5, 3, 6, 6)).shape[0] == 5
    assert ImageSelfSupervision(embed_dim=4, images=50).second_views(torch.randn(5, 3, 6, 6)).shape[0] == 5


@pytest.mark.parametrize("overrides", [
    {"loss.image_ssl_weight": -1.0},
    {"loss.image_ssl_temperature": 0.0},
    {"loss.image_ssl_images": -2},
    {"loss.image_ssl_warmup_steps": -1},
    {"loss.image_ssl_weight": 0.5, "optim.accumulation": 2, "optim.batch_size": 8},
    {"loss.image_ssl_weight": 0.5, "model.freeze_vision": True},
])
def test_config_refuses_settings_the_term_cannot_use(overrides):
    config = TrainConfig()
    for key, value in overrides.items():
        config.set(key, value)
    with pytest.raises(ConfigError, match="image_ssl"):
        config.validate()


def test_a_step_with_the_term_follows_the_gradient_of_the_summed_loss():
    """The stepper's update equals one computed by hand: image tower on the batch and its second views in one
    forward, contrastive loss on the batch, plus the term on the first images and their views, at the weight
    of the step's place in the term's warmup."""
    from openalign.losses import build_loss
    from openalign.model_config import AlignConfig, AlignTextConfig, AlignVisionConfig
    from openalign.models.align import AlignModel
    from openalign.train.loop import DualEncoderFeatures, Stepper

    vision = AlignVisionConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.25, drop_connect_rate=0.0)
    vision = vision.replace(hidden_dim=vision.output_channels)
    text = AlignTextConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                           intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = AlignConfig(text_config=text, vision_config=vision, projection_dim=vision.output_channels)
    torch.manual_seed(0)
    batch = {"pixel_values": torch.randn(6, 3, 32, 32), "input_ids": torch.randint(5, 50, (6, 7)),
             "attention_mask": torch.ones(6, 7, dtype=torch.long),
             "token_type_ids": torch.zeros(6, 7, dtype=torch.long)}
    loss_module = build_loss("align", normalize=True)

    def build():
        torch.manual_seed(1)
        model = AlignModel(config).train()
        term = ImageSelfSupervision(config.projection_dim, weight=0.5, images=4, warmup_steps=4)
        return model, term

    model, term = build()
    optimizer = torch.optim.SGD([*model.parameters(), *term.parameters()], lr=0.1)
    stepper = Stepper(features=DualEncoderFeatures(model),
                      loss_fn=lambda image, text_: loss_module(image, text_, model.temperature), optimizer=optimizer,
                      scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                      scaler=torch.amp.GradScaler("cpu", enabled=False),
                      parameters=[*model.parameters(), *term.parameters()], image_ssl=term)
    torch.manual_seed(7)
    result = stepper.step(batch, 2)  # halfway through the term's warmup: half its weight

    oracle, oracle_term = build()
    torch.manual_seed(7)  # the same second views
    views = second_view(batch["pixel_values"][:4])
    image = oracle.get_image_features(torch.cat([batch["pixel_values"], views]))
    text_features = oracle.get_text_features(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    contrastive = loss_module(image[:6], text_features, oracle.temperature)
    ssl = oracle_term(image[:4], image[6:]) / 2
    total = contrastive + ssl
    total.backward()
    assert result.loss == pytest.approx(total.item(), rel=1e-5)
    assert result.image_ssl_loss == pytest.approx(ssl.item(), rel=1e-5) and result.image_ssl_loss > 0
    for (name, updated), start in zip(model.named_parameters(), oracle.parameters()):
        expected = start.detach() - 0.1 * start.grad if start.grad is not None else start.detach()
        assert torch.allclose(updated.detach(), expected, atol=1e-6), name
    head_moved = [not torch.equal(a, b) for a, b in zip(term.parameters(), oracle_term.parameters())]
    assert all(head_moved)
