"""`openalign zero-shot` and `openalign compare`: their JSON equals the model called directly (every prompt
padded to max_length, one forward per tower, softmax of cosine / temperature written out here)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from openalign.cli import main
from openalign.eval.heatmap import CompareInputError, plot_similarity_heatmap
from openalign.eval.templates import IMAGENET_TEMPLATES
from openalign.inference.encoders import EncoderLoadError, load_encoders
from openalign.models.align import AlignModel
from tests.cli_fixtures import direct_image_embeddings, direct_text_embeddings, make_images

LABELS = ["red square", "dog", "cat sleeping", "yellow car"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"), 3)


def _oracle_probabilities(checkpoint, images, labels, templates, temperature=None) -> np.ndarray:
    """(N, C) probabilities: class embedding = renormalised mean of normalised prompt embeddings; the
    checkpoint's temperature unless one is given."""
    classes = []
    for label in labels:
        prompts = direct_text_embeddings(checkpoint, [template.format(label) for template in templates])
        classes.append(torch.nn.functional.normalize(prompts.mean(dim=0), dim=-1))
    if temperature is None:
        temperature = float(AlignModel.from_pretrained(checkpoint).temperature.detach())
    logits = direct_image_embeddings(checkpoint, images) @ torch.stack(classes).T / temperature
    return logits.softmax(dim=-1).numpy()


def _run_json(capsys, arguments) -> object:
    capsys.readouterr()
    assert main(arguments) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("templates", ["photo", "imagenet80"])
def test_zero_shot_json_equals_the_model_called_directly(checkpoint, images, capsys, templates):
    rows = _run_json(capsys, ["zero-shot", *map(str, images), "--labels", *LABELS, "--model", str(checkpoint),
                              "--templates", templates, "-k", "3", "--json"])
    template_list = IMAGENET_TEMPLATES if templates == "imagenet80" else ("a photo of a {}.",)
    probabilities = _oracle_probabilities(checkpoint, images, LABELS, template_list)
    assert [row["image"] for row in rows] == [str(image) for image in images]
    for row, expected in zip(rows, probabilities):
        order = np.argsort(-expected)[:3]
        assert row["labels"] == [LABELS[index] for index in order]
        np.testing.assert_allclose(row["probabilities"], expected[order], rtol=1e-4, atol=1e-6)
    # The checkpoint's temperature (0.07) is the one applied: at 1.0 the probabilities would differ.
    at_one = _oracle_probabilities(checkpoint, images, LABELS, template_list, temperature=1.0)
    assert not np.allclose([row["probabilities"] for row in rows], np.sort(at_one, axis=1)[:, ::-1][:, :3],
                           rtol=1e-2)


def test_labels_file_custom_templates_and_table(checkpoint, images, tmp_path, capsys):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("# classes\ndog\n\ncat sleeping\n")
    templates_file = tmp_path / "templates.txt"
    templates_file.write_text("a drawing of a {}.\nthe origami {}.\n")
    arguments = ["zero-shot", str(images[0]), "--labels", "red square", "--labels-file", str(labels_file),
                 "--templates", str(templates_file), "--model", str(checkpoint)]
    rows = _run_json(capsys, arguments + ["--json"])
    labels = ["red square", "dog", "cat sleeping"]
    expected = _oracle_probabilities(checkpoint, images[:1], labels, ["a drawing of a {}.", "the origami {}."])[0]
    assert sorted(rows[0]["labels"]) == sorted(labels)
    np.testing.assert_allclose([expected[labels.index(label)] for label in rows[0]["labels"]],
                               rows[0]["probabilities"], rtol=1e-4)

    main(arguments)
    table = capsys.readouterr().out.splitlines()
    assert table[0] == str(images[0])
    assert table[1].startswith(f"  1. {rows[0]['labels'][0]}")
    assert table[1].endswith(f"{rows[0]['probabilities'][0]:.2%}")


def test_a_checkpoint_without_tokenizer_files_is_named(checkpoint, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint / name, bare / name)
    with pytest.raises(EncoderLoadError, match=f"{bare}.*no tokenizer"):
        load_encoders(bare)


def test_compare_matrix_equals_direct_cosines_and_draws_a_heatmap(checkpoint, images, tmp_path, capsys):
    texts = ["a red square", "a dog on the beach"]
    heatmap = tmp_path / "heat.png"
    result = _run_json(capsys, ["compare", *map(str, images), "-t", texts[0], "-t", texts[1], "--model",
                                str(checkpoint), "--out", str(heatmap), "--json"])
    expected = direct_image_embeddings(checkpoint, images) @ direct_text_embeddings(checkpoint, texts).T
    np.testing.assert_allclose(result["similarity"], expected.numpy(), atol=1e-5)
    with Image.open(heatmap) as picture:
        assert picture.format == "PNG" and picture.width > 200 and picture.height > 200

    main(["compare", *map(str, images), "-t", texts[0], "-t", texts[1], "--model", str(checkpoint), "--out",
          str(heatmap)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[1:] == [f"{value:.3f}" for value in result["similarity"][0]]
    assert f"[1] {texts[1]}" in lines

    with pytest.raises(CompareInputError, match="does not fit 3 images and 1 texts"):
        plot_similarity_heatmap(images, texts[:1], np.zeros((3, 2)), tmp_path / "wrong.png")


def test_a_figure_extension_matplotlib_cannot_write_is_one_line_before_any_work(images, tmp_path, capsys):
    # The model does not exist: the extension is refused first, and nothing is loaded.
    assert main(["compare", str(images[0]), "-t", "a dog", "-m", str(tmp_path / "no-model"), "--out",
                 str(tmp_path / "heat.jpgg")]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "heat.jpgg: a figure cannot be written as .jpgg" in error, error
    assert ".png" in error and ".svg" in error and not (tmp_path / "heat.jpgg").exists()
    assert main(["eval", "zero-shot", str(tmp_path), "-m", str(tmp_path / "no-model"), "--confusion",
                 str(tmp_path / "confusion.pnj")]) == 1
    assert "cannot be written as .pnj" in capsys.readouterr().err


def test_heatmap_colour_scale_can_be_fixed_so_pictures_compare(images, tmp_path, monkeypatch):
    from openalign.eval import heatmap

    figures = []
    monkeypatch.setattr(heatmap, "save_figure", lambda figure, path: figures.append(figure) or path)
    matrix = np.array([[0.2, 0.3], [0.25, 0.1], [0.05, 0.15]])
    for scale in ("auto", "cosine", "positive"):
        plot_similarity_heatmap(images, ["a", "b"], matrix, tmp_path / f"{scale}.png", scale=scale)
    limits = [figure.axes[0].images[0].get_clim() for figure in figures]  # the matrix is drawn first
    assert limits == [(0.05, 0.3), (-1.0, 1.0), (0.0, 1.0)]
    with pytest.raises(CompareInputError, match="scale 'log'"):
        plot_similarity_heatmap(images, ["a", "b"], matrix, tmp_path / "x.png", scale="log")
