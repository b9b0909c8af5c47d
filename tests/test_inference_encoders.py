"""Encoders, the one place the commands embed through: each path (optimised, plain, bfloat16) against the
model called directly, batching that does not change results, and errors that name what is wrong."""

from __future__ import annotations

import pytest
import torch

from openalign.cli import main
from openalign.errors import ImageLoadError
from openalign.inference.encoders import EncoderLoadError, load_encoders
from tests.cli_fixtures import CAPTIONS, direct_image_embeddings, direct_text_embeddings, make_images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"), 5)


@pytest.mark.parametrize("optimize", [True, False])
def test_float32_paths_equal_the_model_called_directly(checkpoint, images, optimize):
    # Batch size 2 splits 5 images and 12 texts unevenly; texts of different lengths share a batch.
    encoders = load_encoders(checkpoint, device="cpu", batch_size=2, optimize=optimize)
    image_embeds = encoders.encode_images(images)
    text_embeds = encoders.encode_texts(CAPTIONS)
    torch.testing.assert_close(image_embeds, direct_image_embeddings(checkpoint, images), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text_embeds, direct_text_embeddings(checkpoint, CAPTIONS), rtol=1e-5, atol=1e-6)
    assert image_embeds.dtype == torch.float32 and image_embeds.shape == (5, encoders.dim)
    torch.testing.assert_close(image_embeds.norm(dim=-1), torch.ones(5))
    assert encoders.temperature == pytest.approx(0.07)


@pytest.mark.parametrize("optimize", [True, False])
def test_bfloat16_stays_close(checkpoint, images, optimize):
    encoders = load_encoders(checkpoint, device="cpu", dtype="bfloat16", optimize=optimize)
    cosine_images = (encoders.encode_images(images) * direct_image_embeddings(checkpoint, images)).sum(-1)
    cosine_texts = (encoders.encode_texts(CAPTIONS) * direct_text_embeddings(checkpoint, CAPTIONS)).sum(-1)
    assert cosine_images.min() > 0.99 and cosine_texts.min() > 0.99


def test_errors_name_the_offending_value(checkpoint, images, tmp_path, capsys):
    with pytest.raises(EncoderLoadError, match="dtype 'float64'"):
        load_encoders(checkpoint, dtype="float64")
    with pytest.raises(EncoderLoadError, match=f"{tmp_path / 'missing'} is not a folder"):
        load_encoders(tmp_path / "missing")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"no")
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        load_encoders(checkpoint).encode_images([images[0], broken])
    # On the command line the same error is one line on stderr and exit status 1.
    assert main(["zero-shot", str(broken), "--labels", "dog", "--model", str(checkpoint)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("openalign zero-shot: item 0") and str(broken) in error and "\n" not in error
