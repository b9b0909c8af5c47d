"""Zero-shot and kNN classification on small synthetic sets whose right answers are known."""

import math

import numpy as np
import pytest
import torch

from openalign.eval.knn import KnnInputError, evaluate_knn, knn_class_scores, knn_classify
from openalign.eval.templates import (
    IMAGENET_TEMPLATES,
    PHOTO_TEMPLATES,
    TemplateError,
    check_templates,
    load_templates,
)
from openalign.eval.zero_shot import (
    ZeroShotInputError,
    build_classifier,
    class_folder,
    classify,
    ensemble_embeddings,
    evaluate_zero_shot,
    plot_confusion_matrix,
)


def test_builtin_templates():
    assert len(IMAGENET_TEMPLATES) == 80
    assert len(set(IMAGENET_TEMPLATES)) == 80
    assert check_templates(IMAGENET_TEMPLATES) == IMAGENET_TEMPLATES
    assert load_templates("photo") == PHOTO_TEMPLATES == ("a photo of a {}.",)
    assert load_templates("imagenet80") is IMAGENET_TEMPLATES


def test_custom_template_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\nan image of a {}.\n\na {} in the wild\n")
    assert load_templates(path) == ("an image of a {}.", "a {} in the wild")
    path.write_text("an image of a {}.\nno placeholder here\n")
    with pytest.raises(TemplateError, match="prompts.txt, template 2 'no placeholder here'"):
        load_templates(path)
    with pytest.raises(TemplateError, match="nowhere.txt"):
        load_templates(tmp_path / "nowhere.txt")


class _WordEncoder:
    """A fake text tower: each prompt is the sum of fixed random vectors of its words. Records every call."""

    def __init__(self, dim=32, seed=0):
        self.generator = np.random.default_rng(seed)
        self.dim = dim
        self.vectors = {}
        self.calls = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        rows = []
        for text in texts:
            words = text.replace(".", "").split()
            for word in words:
                if word not in self.vectors:
                    self.vectors[word] = self.generator.standard_normal(self.dim)
            rows.append(sum(self.vectors[word] for word in words))
        return torch.tensor(np.array(rows), dtype=torch.float32)


def test_build_classifier_is_mean_of_normalised_prompts_renormalised():
    encoder = _WordEncoder()
    labels = ["cat", "dog", "red bicycle"]
    templates = ["a photo of a {}.", "a drawing of the {}.", "{}"]
    classifier = build_classifier(encoder, labels, templates)
    assert classifier.shape == (3, 32)
    for class_index, label in enumerate(labels):
        prompts = [template.format(label) for template in templates]
        assert prompts in encoder.calls
        # Reference in float64 straight from the definition.
        rows = [sum(encoder.vectors[w] for w in p.replace(".", "").split()) for p in prompts]
        unit_rows = [row / np.linalg.norm(row) for row in rows]
        mean = np.mean(unit_rows, axis=0)
        np.testing.assert_allclose(classifier[class_index].numpy(), mean / np.linalg.norm(mean), atol=1e-6)


def test_ensemble_is_the_same_however_many_classes_share_an_encoder_call():
    prompts_per_class = [["a cat", "the cat"], ["a dog"], ["a red bicycle", "red bicycle", "the bicycle"]]
    encoder = _WordEncoder()
    one_call = ensemble_embeddings(encoder, prompts_per_class, classes_per_call=None)
    assert encoder.calls == [[prompt for prompts in prompts_per_class for prompt in prompts]]
    for classes_per_call in (1, 2):
        encoder.calls.clear()
        grouped = ensemble_embeddings(encoder, prompts_per_class, classes_per_call=classes_per_call)
        assert len(encoder.calls) == math.ceil(3 / classes_per_call)
        torch.testing.assert_close(grouped, one_call, rtol=0, atol=1e-6)
    for class_index, prompts in enumerate(prompts_per_class):
        units = [row / np.linalg.norm(row) for row in
                 (sum(encoder.vectors[word] for word in prompt.split()) for prompt in prompts)]
        mean = np.mean(units, axis=0)
        np.testing.assert_allclose(one_call[class_index].numpy(), mean / np.linalg.norm(mean), atol=1e-6)
    with pytest.raises(ZeroShotInputError, match="'a cat'"):
        ensemble_embeddings(lambda texts: torch.zeros(1, 4), prompts_per_class)


def _synthetic_classes(num_classes=6, per_class=20, dim=16, noise=0.3, seed=0):
    """Class centres on random directions; items are centre + noise, so the nearest centre is the class."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(num_classes), per_class)
    items = centres[labels] + noise * rng.standard_normal((len(labels), dim)) / math.sqrt(dim)
    return centres.astype(np.float32), items.astype(np.float32), labels


def test_classify_and_evaluate_on_separable_set():
    centres, images, labels = _synthetic_classes()
    indices, probabilities = classify(images, centres, k=3, temperature=0.01)
    assert (indices[:, 0] == labels).all()
    assert np.all(np.diff(probabilities, axis=1) <= 0)
    # Reference softmax over all classes of cosine / temperature.
    unit = images / np.linalg.norm(images, axis=1, keepdims=True)
    logits = (unit @ centres.T) / 0.01
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probabilities[:, 0], expected.max(axis=1), rtol=1e-4)

    metrics = evaluate_zero_shot(images, labels, centres, chunk_size=7)
    assert metrics["top1"] == 100.0 and metrics["top5"] == 100.0
    np.testing.assert_array_equal(metrics["confusion_matrix"], np.diag(np.bincount(labels)))
    assert metrics["per_class_accuracy"] == [100.0] * 6


def test_evaluate_zero_shot_matches_brute_force_with_errors():
    centres, images, labels = _synthetic_classes(noise=4.0, seed=3)  # heavy noise: many mistakes
    metrics = evaluate_zero_shot(images, labels, centres, chunk_size=11)
    scores = (images / np.linalg.norm(images, axis=1, keepdims=True)) @ centres.T
    order = np.argsort(-scores, axis=1)
    assert 0 < metrics["top1"] < 100
    assert metrics["top1"] == pytest.approx(100 * np.mean(order[:, 0] == labels))
    assert metrics["top5"] == pytest.approx(100 * np.mean([labels[i] in order[i, :5] for i in range(len(labels))]))
    expected_confusion = np.zeros((6, 6), dtype=np.int64)
    for true_class, predicted in zip(labels, order[:, 0]):
        expected_confusion[true_class, predicted] += 1
    np.testing.assert_array_equal(metrics["confusion_matrix"], expected_confusion)
    for class_index in range(6):
        in_class = labels == class_index
        expected = 100 * np.mean(order[in_class, 0] == class_index)
        assert metrics["per_class_accuracy"][class_index] == pytest.approx(expected)


def test_zero_shot_end_to_end_with_prompts(tmp_path):
    # Images sit near the word vector of their class name, so prompt ensembles must recover the class.
    encoder = _WordEncoder(dim=64, seed=1)
    labels = ["apple", "boat", "cloud", "daisy"]
    classifier = build_classifier(encoder, labels, PHOTO_TEMPLATES + ("a {}.",))
    rng = np.random.default_rng(2)
    true = np.repeat(np.arange(4), 5)
    images = np.stack([encoder.vectors[labels[c]] for c in true]) + 0.2 * rng.standard_normal((20, 64))
    metrics = evaluate_zero_shot(images, true, classifier)
    assert metrics["top1"] == 100.0
    path = plot_confusion_matrix(metrics["confusion_matrix"], labels, tmp_path / "plots" / "confusion.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _reference_knn(train, train_labels, test, k, temperature, num_classes):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    scores = np.zeros((len(test), num_classes))
    for row, query in enumerate(test):
        similarity = train @ query
        for neighbour in np.argsort(-similarity)[:k]:
            scores[row, train_labels[neighbour]] += np.exp(similarity[neighbour] / temperature)
    return scores


@pytest.mark.parametrize("k, temperature", [(1, 0.07), (5, 0.07), (10, 0.5)])
def test_knn_scores_match_brute_force(k, temperature):
    _, train, train_labels = _synthetic_classes(num_classes=5, per_class=12, noise=3.0, seed=4)
    _, test, _ = _synthetic_classes(num_classes=5, per_class=4, noise=3.0, seed=5)
    scores = knn_class_scores(train, train_labels, test, k=k, temperature=temperature, chunk_size=6)
    expected = _reference_knn(train, train_labels, test, k, temperature, 5)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-4)
    predictions, top_scores = knn_classify(train, train_labels, test, k=k, temperature=temperature, top=3)
    np.testing.assert_array_equal(predictions[:, 0], expected.argmax(axis=1))
    np.testing.assert_allclose(top_scores, -np.sort(-expected, axis=1)[:, :3], rtol=1e-4)


def test_knn_accuracy_on_separable_set():
    _, train, train_labels = _synthetic_classes(num_classes=8, per_class=10, seed=6)
    _, test, test_labels = _synthetic_classes(num_classes=8, per_class=3, seed=6)
    metrics = evaluate_knn(train, train_labels, test, test_labels, k=5)
    assert metrics["top1"] == 100.0 and metrics["top5"] == 100.0
    # Shuffled train labels destroy the signal: accuracy must drop.
    shuffled = np.random.default_rng(0).permutation(train_labels)
    assert evaluate_knn(train, shuffled, test, test_labels, k=5)["top1"] < 60.0


def test_knn_bad_inputs():
    train = np.zeros((4, 3))
    with pytest.raises(KnnInputError, match="k=9"):
        knn_classify(train + 1, [0, 1, 0, 1], train + 1, k=9)
    with pytest.raises(KnnInputError, match="train_labels has shape"):
        knn_classify(train + 1, [0, 1], train + 1, k=1)


def test_class_folder(tmp_path):
    for name, files in {
        "golden_retriever": ["b.jpg", "a.PNG", "notes.txt"],
        "cat": ["x/deep.jpeg"],
        "empty": [],
    }.items():
        (tmp_path / name).mkdir()
        for file in files:
            (tmp_path / name / file).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / file).write_bytes(b"")
    paths, labels, names = class_folder(tmp_path)
    assert names == ["cat", "empty", "golden retriever"]
    assert [path.relative_to(tmp_path).as_posix() for path in paths] == [
        "cat/x/deep.jpeg",
        "golden_retriever/a.PNG",
        "golden_retriever/b.jpg",
    ]
    assert labels.tolist() == [0, 2, 2]
    with pytest.raises(ZeroShotInputError, match="no class sub-folder"):
        class_folder(tmp_path / "cat" / "x")
