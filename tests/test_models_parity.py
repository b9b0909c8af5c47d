"""openalign against transformers' AlignModel: outputs, hidden states, attentions, loss and gradients."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from openalign.models.align import AlignModel  # noqa: E402
from tests.parity import assert_close, pixel_inputs, randomize, text_inputs, tiny_config  # noqa: E402

CONFIGS = {
    "default-odd-size": dict(image_size=33),
    "wide-deep": dict(width=0.5, depth=0.5, image_size=40, hidden_size=48, num_layers=3, num_heads=6),
    "kernels-strides": dict(kernel_sizes=(5, 3, 3, 7, 3, 5, 3), strides=(2, 1, 2, 2, 1, 2, 1), image_size=45),
    "depthwise-padding-max-pool": dict(depthwise_padding=(1, 3), pooling_type="max", image_size=37),
    "even-size": dict(image_size=48, depth=0.25),
}


def openalign_to_transformers(model: AlignModel, folder) -> torch.nn.Module:
    model.save_pretrained(folder)
    return transformers.AlignModel.from_pretrained(folder).eval()


def compare_outputs(ours, theirs, rtol=1e-5):
    worst = 0.0
    if ours.logits_per_text.shape[0] == 1:  # one pair: the loss is exactly zero on both sides
        assert ours.loss.item() == theirs.loss.item() == 0.0
    else:
        worst = assert_close(ours.loss, theirs.loss, rtol, "loss")
    for name in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        worst = max(worst, assert_close(getattr(ours, name), getattr(theirs, name), rtol, name))
    ours_text, theirs_text = ours.text_model_output, theirs.text_model_output
    ours_vision, theirs_vision = ours.vision_model_output, theirs.vision_model_output
    worst = max(worst, assert_close(ours_text.pooler_output, theirs_text.pooler_output, rtol, "text pooler"))
    worst = max(worst, assert_close(ours_vision.pooler_output, theirs_vision.pooler_output, rtol, "image pooler"))
    assert len(ours_text.hidden_states) == len(theirs_text.hidden_states)
    for i, (a, b) in enumerate(zip(ours_text.hidden_states, theirs_text.hidden_states)):
        worst = max(worst, assert_close(a, b, rtol, f"text hidden state {i}"))
    assert len(ours_text.attentions) == len(theirs_text.attentions)
    for i, (a, b) in enumerate(zip(ours_text.attentions, theirs_text.attentions)):
        worst = max(worst, assert_close(a, b, rtol, f"attention {i}"))
    assert len(ours_vision.hidden_states) == len(theirs_vision.hidden_states)
    for i, (a, b) in enumerate(zip(ours_vision.hidden_states, theirs_vision.hidden_states)):
        worst = max(worst, assert_close(a, b, rtol, f"vision hidden state {i}"))
    last_ours, last_theirs = ours_vision.last_hidden_state, theirs_vision.last_hidden_state
    worst = max(worst, assert_close(last_ours, last_theirs, rtol, "vision last hidden state"))
    return worst


def run_both(ours, theirs, inputs):
    kwargs = dict(return_loss=True, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        return ours(**inputs, **kwargs), theirs(**inputs, **kwargs)


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_outputs_equal_transformers(tmp_path, name, batch_size):
    config = tiny_config(**CONFIGS[name])
    ours = randomize(AlignModel(config), seed=len(name)).eval()
    theirs = openalign_to_transformers(ours, tmp_path)
    inputs = {**text_inputs(config, batch_size, 11, seed=1), "pixel_values": pixel_inputs(config, batch_size, 2)}
    ours_out, theirs_out = run_both(ours, theirs, inputs)
    # Activations must be alive through the whole trunk, or equality would be vacuous.
    assert ours_out.vision_model_output.last_hidden_state.abs().max() > 0.05
    compare_outputs(ours_out, theirs_out)


def test_transformers_weights_load_into_openalign(tmp_path):
    """The other direction: a model saved by transformers loads into openalign and agrees."""
    config = tiny_config(image_size=35)
    source = randomize(AlignModel(config), seed=5)
    theirs = openalign_to_transformers(source, tmp_path / "a")
    with torch.no_grad():  # perturb in transformers so nothing of the openalign source survives
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    theirs.save_pretrained(tmp_path / "b")
    ours = AlignModel.from_pretrained(tmp_path / "b")
    inputs = {**text_inputs(config, 2, 9, seed=3), "pixel_values": pixel_inputs(config, 2, 4)}
    compare_outputs(*run_both(ours, theirs, inputs))


def test_return_dict_false_and_features(tmp_path):
    config = tiny_config()
    ours = randomize(AlignModel(config), seed=2).eval()
    theirs = openalign_to_transformers(ours, tmp_path)
    text = text_inputs(config, 2, 7)
    pixels = pixel_inputs(config, 2)
    with torch.no_grad():
        ours_tuple = ours(**text, pixel_values=pixels, return_dict=False)
        theirs_tuple = theirs(**text, pixel_values=pixels, return_dict=False)
        assert len(ours_tuple) == len(theirs_tuple) == 6  # loss is None and dropped
        assert_close(ours_tuple[0], theirs_tuple[0], name="logits_per_image")
        text_features = ours.get_text_features(**text)
        assert isinstance(text_features, torch.Tensor)
        assert_close(text_features, theirs.get_text_features(**text).pooler_output, name="text features")
        image_features = ours.get_image_features(pixels)
        assert_close(image_features, theirs.get_image_features(pixels).pooler_output, name="image features")


def test_gradients_equal_transformers(tmp_path):
    """Train mode (BatchNorm on batch statistics), dropout off: every parameter gradient agrees.
    In float64, so that gradients that are zero in exact arithmetic are not lost in float32 rounding."""
    config = tiny_config(image_size=33, dropout=0.0)
    ours = randomize(AlignModel(config), seed=7)
    theirs = openalign_to_transformers(ours, tmp_path)
    ours.double().train()
    theirs.double().train()
    inputs = {**text_inputs(config, 4, 10, seed=8), "pixel_values": pixel_inputs(config, 4, 9).double()}
    ours(**inputs, return_loss=True).loss.backward()
    theirs(**inputs, return_loss=True).loss.backward()
    theirs_grads = dict(theirs.named_parameters())
    # Gradients that are zero in exact arithmetic (a bias followed by a train-mode BatchNorm) come out as
    # rounding noise on both sides; they are held to the tolerance at 1e-6 of the largest gradient.
    floor = 1e-6 * max(p.grad.abs().max().item() for p in theirs.parameters() if p.grad is not None)
    checked = 0
    for name, p in ours.named_parameters():
        reference = theirs_grads[name].grad
        if name.startswith("text_model.pooler"):
            assert p.grad is None and reference is None  # the pooler is not on the loss path
            continue
        assert p.grad is not None, name
        scale = reference.abs().max().item()
        difference = (p.grad - reference).abs().max().item()
        assert difference <= 1e-5 * max(scale, floor), f"{name}: {difference} at scale {scale}"
        checked += 1
    assert checked == len(list(ours.parameters())) - 2


@pytest.mark.parametrize("where", ["model", "vision tower", "text tower"])
def test_gradient_checkpointing_same_gradients(where):
    config = tiny_config(image_size=33)
    model = randomize(AlignModel(config), seed=3).train()
    inputs = {**text_inputs(config, 3, 8, seed=4), "pixel_values": pixel_inputs(config, 3, 5)}

    def gradients():
        model.zero_grad()
        model(**inputs, return_loss=True).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    stats_before = model.vision_model.embeddings.batchnorm.running_mean.clone()
    plain = gradients()
    stats_after_plain = model.vision_model.embeddings.batchnorm.running_mean.clone()
    model.vision_model.embeddings.batchnorm.running_mean.copy_(stats_before)
    {
        "model": model.gradient_checkpointing_enable,
        "vision tower": model.vision_model.gradient_checkpointing_enable,
        "text tower": model.text_model.gradient_checkpointing_enable,
    }[where]()
    assert model.is_gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    # Recomputation in the backward pass does not count the batch twice in BatchNorm statistics.
    first_block_bn = model.vision_model.encoder.blocks[0].depthwise_conv.depthwise_norm
    assert first_block_bn.num_batches_tracked.item() == 2  # one plain step + one checkpointed step
    torch.testing.assert_close(model.vision_model.embeddings.batchnorm.running_mean, stats_after_plain)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_text_features_compute_cls_alone_to_the_same_values_and_gradients(checkpointing):
    """get_text_features runs the last layer on [CLS] alone: the same features and parameter gradients as the
    full last layer (float64, train mode, dropout off, padded texts)."""
    config = tiny_config(dropout=0.0)
    model = randomize(AlignModel(config), seed=5).double().train()
    if checkpointing:
        model.text_model.gradient_checkpointing_enable()
    text = text_inputs(config, 3, 9, seed=6)
    assert (text["attention_mask"] == 0).any()
    weights = torch.randn(3, config.projection_dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run(cls_alone: bool):
        model.zero_grad()
        if cls_alone:
            features = model.get_text_features(**text)
        else:
            features = model.text_projection(model.text_model(**text).last_hidden_state[:, 0])
        (features * weights).sum().backward()
        return features.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast_features, fast_grads = run(True)
    full_features, full_grads = run(False)
    torch.testing.assert_close(fast_features, full_features, rtol=1e-10, atol=1e-12)
    assert fast_grads.keys() == full_grads.keys() and len(fast_grads) > 10
    for name in full_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name], rtol=1e-9, atol=1e-12, msg=name)
    hidden = model.text_model(**text, first_token_only=True).last_hidden_state
    assert hidden.shape == (3, 1, config.text_config.hidden_size)
