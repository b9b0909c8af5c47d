"""oneDNN linear layers with packed weights (inference/linear.py) against F.linear, and where they are used."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from openalign.inference.linear import PackedLinear, onednn_linear_available, pack_linears
from openalign.model_config import get_preset
from openalign.models.align import AlignModel

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
def test_packed_linear_equals_linear_and_its_gelu(activation):
    torch.manual_seed(0)
    linear = nn.Linear(48, 96)
    packed = PackedLinear(linear, activation)
    x = torch.randn(3, 7, 48)
    expected = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    if activation is not None:
        expected = F.gelu(expected, approximate="tanh" if activation == "gelu_tanh" else "none")
    with torch.inference_mode():
        output = packed(x)
    assert packed._packed is not None  # the oneDNN path ran
    assert float((output.double() - expected).abs().max() / expected.abs().max()) < 1e-6
    with torch.inference_mode():
        bfloat16 = PackedLinear(copy.deepcopy(linear).bfloat16(), activation)(x.bfloat16())
    assert bfloat16.dtype == torch.bfloat16
    assert float(F.cosine_similarity(bfloat16.double().flatten(), expected.flatten(), dim=0)) > 0.9999


@needs_onednn
def test_a_changed_weight_is_packed_again_and_copies_drop_the_packed_weight():
    linear = nn.Linear(8, 4)
    packed = PackedLinear(linear)
    x = torch.randn(2, 8)
    with torch.inference_mode():
        first = packed(x)
        with torch.no_grad():
            linear.weight.mul_(2)
        second = packed(x)
    torch.testing.assert_close(second - linear.bias, 2 * (first - linear.bias))
    for duplicate in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):
        assert duplicate._packed is None
        with torch.inference_mode():
            torch.testing.assert_close(duplicate(x), second)


def test_with_autograd_or_while_tracing_it_is_the_plain_linear():
    linear = nn.Linear(8, 4)
    packed = PackedLinear(linear, "gelu")
    x = torch.randn(2, 8, requires_grad=True)
    output = packed(x)
    assert packed._packed is None and output.grad_fn is not None
    torch.testing.assert_close(output, F.gelu(linear(x)))
    traced = torch.jit.trace(packed, torch.randn(2, 8).requires_grad_(False), check_trace=False)
    assert "mkldnn" not in str(traced.inlined_graph)


def test_optimize_for_inference_packs_every_text_linear_and_fuses_the_feed_forward_gelu():
    model = AlignModel(get_preset("tiny")).eval()
    text = model.optimize_for_inference().text
    kinds = [type(module).__name__ for module in text.modules() if isinstance(module, (nn.Linear, PackedLinear))]
    assert kinds and set(kinds) == {"PackedLinear"}
    activations = [module.activation for module in text.modules() if isinstance(module, PackedLinear)]
    assert activations.count("gelu") == model.config.text_config.num_hidden_layers
    unpacked = AlignModel(get_preset("tiny")).eval().optimize_for_inference(compile=False).text
    pack_linears(unpacked)  # idempotent: nothing left to pack
    assert not any(isinstance(module, nn.Linear) for module in unpacked.modules())


def test_bfloat16_text_keeps_its_residual_stream_and_layernorms_in_float32():
    """Matrix products in bfloat16, the rest in float32, as autocast runs it: closer to float32 than bfloat16
    all through."""
    torch.manual_seed(0)
    model = AlignModel(get_preset("tiny")).eval()
    text = model.optimize_for_inference(dtype=torch.bfloat16).text
    norms = [module for module in text.modules() if isinstance(module, (nn.LayerNorm, nn.Embedding))]
    assert norms and all(module.weight.dtype == torch.float32 for module in norms)
    linears = [module for module in text.modules() if isinstance(module, PackedLinear)]
    assert all(module.weight.dtype == torch.bfloat16 for module in linears)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, model.config.text_config.vocab_size, (4, 9), generator=generator)
    with torch.inference_mode():
        output = text(input_ids, torch.ones_like(input_ids)).float()
        reference = model.get_text_features(input_ids, torch.ones_like(input_ids))
    assert float(F.cosine_similarity(output, reference).min()) > 0.9999
