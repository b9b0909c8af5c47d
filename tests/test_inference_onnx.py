"""ONNX export: onnxruntime against the plain PyTorch model (the oracle), at shapes other than the export's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from openalign.cli import main
from openalign.inference.export import TEXT_INPUTS, export_onnx, onnx_session
from tests.test_inference_optimize import make_model

pytest.importorskip("onnxruntime")
RELATIVE = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = make_model()
    out_dir = tmp_path_factory.mktemp("onnx")
    manifest = export_onnx(model, out_dir)
    return model, out_dir, manifest


def relative_error(result, reference: torch.Tensor) -> float:
    return float((torch.as_tensor(result) - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("batch", [1, 5])
def test_vision_graph_equals_pytorch_for_any_batch(exported, batch):
    model, out_dir, _ = exported
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    (result,) = onnx_session(out_dir / "vision.onnx").run(None, {"pixel_values": pixel_values.numpy()})
    with torch.no_grad():
        expected = model.get_image_features(pixel_values)
    assert result.shape == tuple(expected.shape)
    assert relative_error(result, expected) < RELATIVE


@pytest.mark.parametrize("batch,length", [(1, 3), (4, 17)])
def test_text_graph_equals_pytorch_for_any_batch_and_length(exported, batch, length):
    model, out_dir, _ = exported
    generator = torch.Generator().manual_seed(length)
    input_ids = torch.randint(1, model.config.text_config.vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, length // 2 + 1 :] = 0  # last row padded
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[0, length // 2 :] = 1
    inputs = dict(zip(TEXT_INPUTS, (input_ids, attention_mask, token_type_ids)))
    (result,) = onnx_session(out_dir / "text.onnx").run(None, {k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        expected = model.get_text_features(**inputs)
    assert relative_error(result, expected) < RELATIVE


def test_manifest_records_check(exported):
    _, out_dir, manifest = exported
    assert json.loads((out_dir / "export.json").read_text()) == manifest
    assert manifest["check"]["vision"]["max_relative"] < RELATIVE
    assert manifest["check"]["text"]["max_relative"] < RELATIVE


def test_cli_exports_a_checkpoint(tmp_path, exported):
    model, out_dir, _ = exported
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    assert main(["export", "onnx", str(checkpoint), str(tmp_path / "out"), "--opset", "17"]) == 0
    manifest = json.loads((tmp_path / "out" / "export.json").read_text())
    assert manifest["opset"] == 17 and manifest["check"]["text"]["max_relative"] < RELATIVE
    # Same weights, same graph: the CLI's vision graph agrees with the library's.
    size = model.config.vision_config.image_size
    pixel_values = np.random.default_rng(0).standard_normal((2, 3, size, size), dtype=np.float32)
    ours = onnx_session(tmp_path / "out" / "vision.onnx").run(None, {"pixel_values": pixel_values})[0]
    library = onnx_session(out_dir / "vision.onnx").run(None, {"pixel_values": pixel_values})[0]
    np.testing.assert_allclose(ours, library, rtol=1e-6, atol=1e-6)
