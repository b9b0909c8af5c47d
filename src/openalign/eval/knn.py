"""Weighted k-nearest-neighbour classification on frozen embeddings.

The protocol of the TF ALIGN reproduction's ImageNet kNN and of DINO (Caron et al. 2021, eval_knn.py): cosine
similarity between L2-normalised test and train embeddings, the k most similar train items vote for their
class with weight exp(similarity / temperature), and classes are ranked by their summed votes.
"""

from __future__ import annotations

import numpy as np
import torch

from openalign.errors import OpenAlignError


class KnnInputError(OpenAlignError, ValueError):
    """Train / test embeddings or labels have inconsistent shapes or values."""


def _as_tensor(array, dtype=torch.float32) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.to(dtype)
    return torch.as_tensor(np.asarray(array), dtype=dtype)


def knn_class_scores(
    train_embeds,
    train_labels,
    test_embeds,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Summed neighbour votes per class for every test item, shape (N_test, num_classes).

    Test items are processed chunk_size at a time so memory is chunk_size x N_train similarities.
    """
    train = torch.nn.functional.normalize(_as_tensor(train_embeds), dim=-1)
    test = torch.nn.functional.normalize(_as_tensor(test_embeds), dim=-1)
    labels = _as_tensor(train_labels, torch.long)
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise KnnInputError(
            f"train_embeds {tuple(train.shape)} and test_embeds {tuple(test.shape)} "
            "must be (N, D) with equal D"
        )
    if labels.shape != (train.shape[0],):
        raise KnnInputError(f"train_labels has shape {tuple(labels.shape)}, expected ({train.shape[0]},)")
    if len(labels) and labels.min() < 0:
        raise KnnInputError(f"train_labels holds the negative label {int(labels.min())}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if len(labels) else 0
    elif len(labels) and labels.max() >= num_classes:
        raise KnnInputError(f"train_labels holds label {int(labels.max())} but num_classes is {num_classes}")
    if not 1 <= k <= train.shape[0]:
        raise KnnInputError(f"k={k} must be between 1 and the number of train items ({train.shape[0]})")

    scores = torch.zeros(test.shape[0], num_classes)
    for start in range(0, test.shape[0], chunk_size):
        similarity = test[start : start + chunk_size] @ train.T  # (B, N_train)
        top_similarity, top_index = similarity.topk(k, dim=1)  # (B, k)
        votes = torch.exp(top_similarity / temperature)
        scores[start : start + chunk_size].scatter_add_(1, labels[top_index], votes)
    return scores


def knn_classify(
    train_embeds,
    train_labels,
    test_embeds,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    top: int = 5,
    chunk_size: int = 1024,
):
    """Predicted classes for every test item, best first.

    Returns (predictions (N_test, top) int64, scores (N_test, top) float32) as numpy arrays; top is clipped
    to the number of classes. See knn_class_scores for the voting rule.
    """
    scores = knn_class_scores(
        train_embeds,
        train_labels,
        test_embeds,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        chunk_size=chunk_size,
    )
    top_scores, predictions = scores.topk(min(top, scores.shape[1]), dim=1)
    return predictions.numpy(), top_scores.numpy()


def evaluate_knn(
    train_embeds,
    train_labels,
    test_embeds,
    test_labels,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict:
    """Top-1 and top-5 kNN accuracy as fractions of the test images (0-1), with the settings used, as a flat
    dict for reports."""
    test_labels = np.asarray(test_labels)
    predictions, _ = knn_classify(
        train_embeds,
        train_labels,
        test_embeds,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        top=5,
        chunk_size=chunk_size,
    )
    hits = predictions == test_labels[:, None]
    return {
        "top1": float(hits[:, :1].any(axis=1).mean()),
        "top5": float(hits.any(axis=1).mean()),
        "k": k,
        "temperature": temperature,
        "num_train": int(len(np.asarray(train_labels))),
        "num_test": int(len(test_labels)),
    }
