"""Zero-shot classification: class embeddings from prompt-template ensembles, then nearest class.

Written against plain embeddings and an `encode_texts(list[str]) -> (N, D)` callable, so any text tower
(AlignModel.get_text_features behind a tokenizer, or a test double) can build the classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from openalign.errors import OpenAlignError
from openalign.eval.templates import check_templates
from openalign.figures import pyplot, save_figure


class ZeroShotInputError(OpenAlignError, ValueError):
    """Labels, embeddings or the classifier have inconsistent shapes or values."""


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def class_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Images of a folder of class sub-folders (ImageNet layout), for eval zero-shot and eval knn.

    Returns (image paths, class index per image, class names); classes are the sub-folder names in sorted
    order and images are found recursively inside each, sorted. Underscores in names become spaces, so
    "golden_retriever" reads naturally in a prompt.
    """
    root = Path(root)
    if not root.is_dir():
        raise ZeroShotInputError(f"{root} is not a folder of class sub-folders")
    class_folders = sorted(path for path in root.iterdir() if path.is_dir())
    if not class_folders:
        raise ZeroShotInputError(f"{root} holds no class sub-folder")
    paths, labels = [], []
    for class_index, folder in enumerate(class_folders):
        images = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
        paths.extend(images)
        labels.extend([class_index] * len(images))
    return paths, np.array(labels, dtype=np.int64), [folder.name.replace("_", " ") for folder in class_folders]


def _as_float_tensor(array) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.detach().float()
    return torch.as_tensor(np.asarray(array), dtype=torch.float32)


@torch.no_grad()
def ensemble_embeddings(
    encode_texts: Callable[[list[str]], torch.Tensor], prompts_per_class: Sequence[Sequence[str]], *,
    classes_per_call: int | None = 1,
) -> torch.Tensor:
    """Class embeddings (C, D) by prompt ensembling: per class, the mean of its L2-normalised prompt embeddings,
    renormalised.

    The prompts of classes_per_call classes go to encode_texts in one call (None: every prompt in one call, for
    a few classes; 1 keeps a batch to one class's prompts however many classes there are).
    """
    step = len(prompts_per_class) if classes_per_call is None else classes_per_call
    class_embeddings = []
    for start in range(0, len(prompts_per_class), max(step, 1)):
        group = prompts_per_class[start : start + step]
        prompts = [prompt for class_prompts in group for prompt in class_prompts]
        embeddings = _as_float_tensor(encode_texts(prompts))  # (prompts of the group, D)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(prompts):
            raise ZeroShotInputError(
                f"encode_texts returned shape {tuple(embeddings.shape)} for {len(prompts)} prompts "
                f"(the first: {prompts[0]!r})"
            )
        embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
        first = 0
        for class_prompts in group:
            mean = embeddings[first : first + len(class_prompts)].mean(dim=0)
            class_embeddings.append(torch.nn.functional.normalize(mean, dim=-1))
            first += len(class_prompts)
    return torch.stack(class_embeddings)


def build_classifier(
    encode_texts: Callable[[list[str]], torch.Tensor], labels: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """Class embeddings (C, D) of labels, each the ensemble of its prompts (one per template, see
    ensemble_embeddings). Each class's prompts are encoded in one call, so a batch holds len(templates) texts.
    """
    templates = check_templates(templates)
    if not labels:
        raise ZeroShotInputError("labels is empty: a classifier needs at least one class")
    return ensemble_embeddings(encode_texts, [[template.format(label) for template in templates] for label in labels])


def class_logits(image_embeds, classifier, temperature: float | None = None) -> torch.Tensor:
    """Cosine similarity of each (normalised) image to each class, divided by temperature where given."""
    images = torch.nn.functional.normalize(_as_float_tensor(image_embeds), dim=-1)
    classes = _as_float_tensor(classifier)
    if images.ndim != 2 or classes.ndim != 2 or images.shape[1] != classes.shape[1]:
        raise ZeroShotInputError(
            f"image_embeds {tuple(images.shape)} and classifier {tuple(classes.shape)} must be 2-d with equal D"
        )
    logits = images @ classes.T  # (N, C)
    return logits / temperature if temperature is not None else logits


def classify(image_embeds, classifier, k: int = 5, temperature: float | None = None):
    """Top-k classes per image, best first: (indices (N, k) int64, probabilities (N, k) float32).

    Probabilities are the softmax over all classes of logits / temperature (temperature 1 when not given);
    k is clipped to the number of classes.
    """
    logits = class_logits(image_embeds, classifier, temperature)
    probabilities = logits.softmax(dim=-1)
    top_probabilities, top_indices = probabilities.topk(min(k, logits.shape[1]), dim=-1)
    return top_indices.numpy(), top_probabilities.numpy()


def evaluate_zero_shot(image_embeds, labels_true, classifier, *, chunk_size: int = 4096) -> dict:
    """Top-1 / top-5 accuracy (percent), per-class top-1 accuracy and the confusion matrix.

    The confusion matrix is (C, C) int64 with rows the true class and columns the predicted class.
    Per-class accuracy is NaN for a class with no test image.
    """
    labels_true = np.asarray(labels_true, dtype=np.int64)
    images = _as_float_tensor(image_embeds)
    num_classes = int(_as_float_tensor(classifier).shape[0])
    if labels_true.shape != (images.shape[0],):
        raise ZeroShotInputError(f"labels_true has shape {labels_true.shape}, expected ({images.shape[0]},)")
    if len(labels_true) and (labels_true.min() < 0 or labels_true.max() >= num_classes):
        bad = labels_true[(labels_true < 0) | (labels_true >= num_classes)][0]
        raise ZeroShotInputError(f"labels_true holds class {bad}, outside [0, {num_classes})")

    top_predictions = np.empty((len(labels_true), min(5, num_classes)), dtype=np.int64)
    for start in range(0, len(labels_true), chunk_size):
        logits = class_logits(images[start : start + chunk_size], classifier)
        top_predictions[start : start + chunk_size] = logits.topk(top_predictions.shape[1], dim=-1).indices.numpy()

    hits = top_predictions == labels_true[:, None]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels_true, top_predictions[:, 0]), 1)
    per_class_total = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = 100.0 * np.diag(confusion) / per_class_total
    return {
        "top1": float(100.0 * hits[:, 0].mean()) if len(hits) else float("nan"),
        "top5": float(100.0 * hits.any(axis=1).mean()) if len(hits) else float("nan"),
        "num_images": int(len(labels_true)),
        "num_classes": num_classes,
        "per_class_accuracy": per_class.tolist(),
        "confusion_matrix": confusion,
    }


def plot_confusion_matrix(matrix, labels: Sequence[str], path: str | Path, *, normalize: bool = True) -> Path:
    """Write the confusion matrix as a PNG heat map (rows true, columns predicted) and return its path.

    Rows are normalised to fractions of each true class when normalize is set. Class names are drawn on the
    axes only up to 50 classes, beyond which they would overlap.
    """
    plt = pyplot()

    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != len(labels):
        raise ZeroShotInputError(f"confusion matrix of shape {matrix.shape} does not fit {len(labels)} labels")
    if normalize:
        with np.errstate(invalid="ignore", divide="ignore"):
            matrix = np.nan_to_num(matrix / matrix.sum(axis=1, keepdims=True))
    size = min(4 + 0.25 * len(labels), 20)
    figure, axes = plt.subplots(figsize=(size, size))
    image = axes.imshow(matrix, cmap="Blues", interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if len(labels) <= 50:
        ticks = np.arange(len(labels))
        axes.set_xticks(ticks, labels=list(labels), rotation=90)
        axes.set_yticks(ticks, labels=list(labels))
    return save_figure(figure, path)
