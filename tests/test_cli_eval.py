"""`openalign eval retrieval | zero-shot | knn`: the numbers equal the metric functions applied to embeddings
computed by the model called directly; datasets on disk are read as documented."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from openalign.cli import main
from openalign.data.sources import write_manifest
from openalign.eval.knn import evaluate_knn
from openalign.eval.retrieval import retrieval_metrics
from openalign.eval.runner import EvalDataError, evaluate_knn_folders, read_caption_set
from openalign.eval.zero_shot import evaluate_zero_shot
from openalign.inference.encoders import load_encoders
from tests.cli_fixtures import CAPTIONS, direct_image_embeddings, direct_text_embeddings, make_images

CLASSES = ["red_square", "dog", "yellow_car"]


def _run_json(capsys, arguments) -> dict:
    capsys.readouterr()
    assert main(arguments) == 0
    return json.loads(capsys.readouterr().out)


def _class_folders(root, per_class, seed):
    for class_index, name in enumerate(CLASSES):
        make_images(root / name, per_class, seed=seed + class_index)
    return root


def test_retrieval_groups_captions_by_image_and_equals_the_metric_on_direct_embeddings(checkpoint, tmp_path,
                                                                                          capsys):
    images = make_images(tmp_path / "images", 4)
    # Image i has captions i, i + 4 (and image 0 a third): rows interleaved, as in a Karpathy-split CSV.
    rows = [{"image": str(images[i % 4]), "caption": CAPTIONS[i]} for i in range(9)]
    manifest = write_manifest(rows, tmp_path / "test.csv")
    paths, captions, text_to_image = read_caption_set(manifest)
    assert paths == [str(path) for path in images] and captions == CAPTIONS[:9]
    assert text_to_image.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0]

    metrics = _run_json(capsys, ["eval", "retrieval", str(manifest), "--model", str(checkpoint), "--json"])
    expected = retrieval_metrics(direct_image_embeddings(checkpoint, images),
                                 direct_text_embeddings(checkpoint, CAPTIONS[:9]), text_to_image)
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    assert metrics["num_images"] == 4 and metrics["num_texts"] == 9

    main(["eval", "retrieval", str(manifest), "--model", str(checkpoint), "--out", str(tmp_path / "r.json")])
    table = capsys.readouterr().out
    assert f"image_to_text_r1  {expected['image_to_text_r1']:.3f}".split() == next(
        line for line in table.splitlines() if line.startswith("image_to_text_r1 ")).split()
    assert json.loads((tmp_path / "r.json").read_text()) == metrics


def test_zero_shot_on_class_folders_equals_evaluate_zero_shot(checkpoint, tmp_path, capsys):
    root = _class_folders(tmp_path / "val", 3, seed=0)
    confusion = tmp_path / "confusion.png"
    metrics = _run_json(capsys, ["eval", "zero-shot", str(root), "--model", str(checkpoint), "--templates", "photo",
                                 "--confusion", str(confusion), "--json"])
    paths = sorted(root.rglob("*.png"))
    labels = np.repeat(np.arange(3), 3)
    names = [name.replace("_", " ") for name in CLASSES]
    names_sorted = sorted(CLASSES)  # class indices follow sorted folder names
    classifier = direct_text_embeddings(checkpoint, [f"a photo of a {n.replace('_', ' ')}." for n in names_sorted])
    expected = evaluate_zero_shot(direct_image_embeddings(checkpoint, paths), labels, classifier)
    assert metrics["class_names"] == sorted(names)
    assert metrics["top1"] == pytest.approx(expected["top1"]) and metrics["top5"] == pytest.approx(expected["top5"])
    assert metrics["per_class_accuracy"] == pytest.approx(expected["per_class_accuracy"])
    assert metrics["confusion_matrix"] == expected["confusion_matrix"].tolist()
    assert sum(map(sum, metrics["confusion_matrix"])) == 9
    with Image.open(confusion) as picture:
        assert picture.format == "PNG"

    main(["eval", "zero-shot", str(root), "--model", str(checkpoint), "--templates", "photo"])
    output = capsys.readouterr().out
    assert "per_class_accuracy" not in output and "yellow car" in output and "top1" in output


def test_knn_on_train_and_test_folders_equals_evaluate_knn(checkpoint, tmp_path, capsys):
    train = _class_folders(tmp_path / "train", 4, seed=10)
    test = tmp_path / "test"
    make_images(test / "yellow_car", 2, seed=20)
    make_images(test / "dog", 2, seed=21)  # a subset of the classes, in another order of indices
    metrics = _run_json(capsys, ["eval", "knn", "--train", str(train), "--test", str(test), "-k", "3",
                                 "--model", str(checkpoint), "--json"])
    train_paths, test_paths = sorted(train.rglob("*.png")), sorted(test.rglob("*.png"))
    train_labels = np.repeat(np.arange(3), 4)  # dog, red_square, yellow_car
    test_labels = np.array([0, 0, 2, 2])  # dog, dog, yellow_car, yellow_car in the train numbering
    expected = evaluate_knn(direct_image_embeddings(checkpoint, train_paths), train_labels,
                            direct_image_embeddings(checkpoint, test_paths), test_labels, k=3, num_classes=3)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key

    shutil.copytree(test / "dog", test / "unicorn")
    with pytest.raises(EvalDataError, match="unicorn"):
        evaluate_knn_folders(load_encoders(checkpoint), train, test)


def test_retrieval_needs_a_caption_per_row(tmp_path):
    images = make_images(tmp_path / "images", 1)
    manifest = write_manifest([{"image": str(images[0]), "caption": ""}], tmp_path / "bad.csv")
    with pytest.raises(EvalDataError, match="no caption"):
        read_caption_set(manifest)


def test_retrieval_reads_every_source_of_pairs_that_train_reads(checkpoint, tmp_path, capsys):
    """A manifest, an image folder with .txt captions and shards of the same pairs give the same figures; a
    caption file (captions without images) is refused in one line."""
    from openalign.data.sources import Record, write_shards

    folder = tmp_path / "photos"
    images = make_images(folder, 5)
    for image, caption in zip(images, CAPTIONS):
        image.with_suffix(".txt").write_text(caption + "\n")
    manifest = write_manifest([{"image": str(image), "caption": caption} for image, caption in zip(images, CAPTIONS)],
                              tmp_path / "pairs.jsonl")
    records = [Record(key=f"pair-{index}", caption=caption, image_bytes=image.read_bytes(), image_ext="png")
               for index, (image, caption) in enumerate(zip(images, CAPTIONS))]
    shards = str(tmp_path / "shards")  # a folder of shards, as train takes it
    assert len(write_shards(records, shards, samples_per_shard=3)) == 2
    results = {source: _run_json(capsys, ["eval", "retrieval", source, "-m", str(checkpoint), "--json"])
               for source in (str(manifest), str(folder), shards)}
    expected = retrieval_metrics(direct_image_embeddings(checkpoint, images),
                                 direct_text_embeddings(checkpoint, CAPTIONS[:5]), np.arange(5))
    for source, metrics in results.items():
        assert metrics["num_images"] == metrics["num_texts"] == 5, source
        for key in ("image_to_text_r1", "text_to_image_r1", "image_to_text_mean_rank"):
            assert metrics[key] == pytest.approx(expected[key]), (source, key)

    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS[:5]) + "\n")
    assert main(["eval", "retrieval", str(captions), "-m", str(checkpoint)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "has no image" in error, error
